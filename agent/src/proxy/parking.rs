//! Idle connections parked off the runtime. A connection whose bytes the kernel moves
//! (sockmap), or whose two spliced directions (splice, kTLS) have both waited a while for bytes
//! ([`super::relay::PARK_AFTER`]), has nothing for the agent to do until one of its legs
//! becomes readable (bytes to move, the verdict passing bytes up, an end, an error); the rest is
//! the idle timeout and the drain deadline. So a parked connection holds no task, no timer, no
//! buffer and no readiness registration of its own: its two sockets sit in its listener's epoll
//! set beside a small record ([`Parked`]: its facts and, under kTLS, its legs' state), and the
//! listener's [`Driver`] hands it back to the accept loop ([`Woken`]) when a leg has something
//! for the agent or it has idled out; the accept loop gives it a task again
//! ([`super::connection::resume`]), and a spliced one parks again once it is idle again.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::relay::{self, Drained, IdleConn, LastProgress, Wake};
use super::state::Admitted;

/// How long after a leg signals readable it is looked at: a leg that entered the sock hash
/// with bytes queued signals readable while the verdict is still redirecting them.
const SETTLE: Duration = Duration::from_millis(5);

/// Epoll events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// Rounds of `epoll_wait` (and checks of connections due) per turn of the driver, so a storm
/// of events cannot keep it from its other work.
const ROUNDS: usize = 16;

/// Connections looked at per turn of the driver.
const CHECKS: usize = 4096;

/// A parked connection: what its end needs, and its two legs.
pub(crate) struct Parked {
    /// The connection.
    pub(crate) conn: Box<Admitted>,
    /// Its legs.
    pub(crate) idle: IdleConn,
}

/// A parked connection taken up again, and why.
pub(crate) struct Woken {
    /// The connection.
    pub(crate) parked: Box<Parked>,
    /// Why it was woken.
    pub(crate) wake: Wake,
}

/// One parked connection and what its checks need.
struct Slot {
    parked: Box<Parked>,
    /// When it last moved a byte.
    last: LastProgress,
    /// Its next check; a check in the queue at another time is stale.
    due: Instant,
    /// A leg signalled readable, and is looked at [`SETTLE`] later (at most one such look is
    /// queued at a time).
    readable: bool,
}

impl Slot {
    /// When to read its progress next: a quarter of its idle timeout from now, or when it idles
    /// out if nothing moves before, whichever comes first.
    fn next_check(&self, now: Instant) -> Instant {
        let idles_out = self.last.since + self.parked.idle.idle_timeout();
        (now + self.every()).min(idles_out).max(now)
    }

    /// How often its progress is read: a quarter of its idle timeout, as a relay's watch does.
    /// Worked out when needed rather than stored: every byte of a slot is paid for by each
    /// parked connection.
    fn every(&self) -> Duration {
        (self.parked.idle.idle_timeout() / 4)
            .clamp(Duration::from_millis(25), Duration::from_secs(5))
    }

    /// Whether the connection has idled out.
    fn idled_out(&mut self, now: Instant) -> bool {
        let [client, _] = self.parked.idle.fds();
        let progress = crate::sys::tcp_progress(client).ok();
        if progress != self.last.progress {
            self.last = LastProgress {
                progress,
                since: now,
            };
            return false;
        }
        now.duration_since(self.last.since) >= self.parked.idle.idle_timeout()
    }
}

/// The parked connections and their checks, in time order.
#[derive(Default)]
struct Lot {
    next_id: u64,
    slots: HashMap<u64, Slot>,
    /// Idle checks, one per slot (entries whose time is not their slot's `due` are stale).
    checks: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Legs that signalled readable, looked at [`SETTLE`] later, in time order.
    settling: VecDeque<(Instant, u64)>,
    /// Past the drain deadline: nothing parks any more.
    closed: bool,
    /// A new agent is taking connections over: those that can move go there instead of
    /// parking.
    move_to: Option<MoveTo>,
    /// Sockmap connections move too (the new agent adopted the maps their entries are in).
    move_sockmap: bool,
}

use super::moving::MoveTo;

/// One listener's parked connections.
pub(crate) struct Parking {
    registry: Registry,
    lot: Mutex<Lot>,
    /// Parked, or woken and not yet taken by the accept loop: the connections its drain still
    /// waits for.
    held: AtomicUsize,
    woken: mpsc::UnboundedSender<Woken>,
    /// Something was parked: the driver's next check may be sooner.
    parked: Notify,
}

/// Runs a listener's [`Parking`]: reads its epoll set, checks its connections when they are
/// due, and wakes them all at the drain deadline.
pub(crate) struct Driver {
    poll: AsyncFd<Poll>,
    parking: Arc<Parking>,
}

impl Parking {
    /// A parking with its own epoll set, the driver to run it, and where the accept loop takes
    /// the connections it wakes.
    pub(crate) fn new() -> io::Result<(Arc<Self>, Driver, mpsc::UnboundedReceiver<Woken>)> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let (woken, taken) = mpsc::unbounded_channel();
        let parking = Arc::new(Self {
            registry,
            lot: Mutex::default(),
            held: AtomicUsize::new(0),
            woken,
            parked: Notify::new(),
        });
        let driver = Driver {
            poll: crate::sys::epoll_on_runtime(poll)?,
            parking: parking.clone(),
        };
        Ok((parking, driver, taken))
    }

    fn lot(&self) -> MutexGuard<'_, Lot> {
        self.lot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks a connection, or during a takeover hands one that can move to the new agent;
    /// gives it back when it cannot be parked (past the drain deadline, or its legs could not
    /// join the epoll set), to be relayed by its own task.
    pub(crate) fn park(&self, parked: Box<Parked>) -> Result<(), Box<Parked>> {
        let now = Instant::now();
        let mut lot = self.lot();
        if lot.closed {
            return Err(parked);
        }
        let parked = match &lot.move_to {
            Some(to) if parked.idle.can_move(lot.move_sockmap) => match to.0.send(parked) {
                Ok(()) => return Ok(()),
                // The moves stopped (the takeover's side is gone): it parks here.
                Err(back) => {
                    lot.move_to = None;
                    back.0
                }
            },
            _ => parked,
        };
        let id = lot.next_id;
        // Never reused, even when parking fails: an event already read for a leg registered
        // under it must not reach another connection.
        lot.next_id += 1;
        let fds = parked.idle.fds().map(|fd| fd.as_raw_fd());
        for (leg, fd) in fds.iter().enumerate() {
            let registered =
                self.registry
                    .register(&mut SourceFd(fd), token(id, leg), Interest::READABLE);
            if let Err(e) = registered {
                for fd in &fds[..leg] {
                    let _ = self.registry.deregister(&mut SourceFd(fd));
                }
                tracing::debug!(listener = %parked.conn.state.config.name, peer = %parked.conn.peer,
                    error = %e, "an idle connection could not be parked; its task relays it");
                return Err(parked);
            }
        }
        let last = parked.idle.last_progress();
        parked.conn.state.telemetry.parked_connections(1);
        let slot = Slot {
            parked,
            last,
            due: now,
            readable: false,
        };
        let due = slot.next_check(now);
        let slot = Slot { due, ..slot };
        lot.slots.insert(id, slot);
        lot.checks.push(Reverse((due, id)));
        self.held.fetch_add(1, Ordering::Relaxed);
        drop(lot);
        self.parked.notify_one();
        Ok(())
    }

    /// A new agent is taking connections over: every parked one that can move goes to `to`
    /// now, and those that park from now on until [`Parking::end_move`] go there too.
    pub(crate) fn move_out(&self, to: MoveTo, sockmap: bool) {
        let mut guard = self.lot();
        let lot = &mut *guard;
        if lot.closed {
            return;
        }
        lot.move_sockmap = sockmap;
        let ids: Vec<u64> = lot
            .slots
            .iter()
            .filter(|(_, slot)| slot.parked.idle.can_move(sockmap))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(parked) = self.unpark(lot, id) else {
                continue;
            };
            match to.0.send(parked) {
                Ok(()) => {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                }
                // The takeover's side is gone already: it stays, woken.
                Err(back) => {
                    self.to_accept_loop(back.0, Wake::Ready);
                    return;
                }
            }
        }
        lot.move_to = Some(to);
    }

    /// The moves are over: connections park here again.
    pub(crate) fn end_move(&self) {
        self.lot().move_to = None;
    }

    /// A connection the agent before this one handed over: taken up by the accept loop as if
    /// it had just been woken (it parks again once idle).
    pub(crate) fn adopt(&self, parked: Box<Parked>) {
        self.held.fetch_add(1, Ordering::Relaxed);
        self.to_accept_loop(parked, Wake::Ready);
    }

    /// Hands a held connection to the accept loop, which gives it a task.
    fn to_accept_loop(&self, parked: Box<Parked>, wake: Wake) {
        if self.woken.send(Woken { parked, wake }).is_err() {
            // The accept loop is gone (it waits for every held connection, so only when its
            // task was cancelled): the connection closes with nothing to report to.
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Connections parked, or woken and not yet taken by the accept loop.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The accept loop took a woken connection.
    pub(crate) fn taken(&self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }

    /// Takes a connection out of the lot and the epoll set (still held: the caller hands it
    /// on).
    fn unpark(&self, lot: &mut Lot, id: u64) -> Option<Box<Parked>> {
        let mut slot = lot.slots.remove(&id)?;
        slot.parked.idle.set_last_progress(slot.last);
        for fd in slot.parked.idle.fds().map(|fd| fd.as_raw_fd()) {
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
        slot.parked.conn.state.telemetry.parked_connections(-1);
        Some(slot.parked)
    }

    /// Takes a connection out of the epoll set and hands it to the accept loop.
    fn wake(&self, lot: &mut Lot, id: u64, wake: Wake) {
        if let Some(parked) = self.unpark(lot, id) {
            self.to_accept_loop(parked, wake);
        }
    }

    /// Wakes every parked connection and parks none from now on (the drain deadline).
    fn close(&self) {
        let mut guard = self.lot();
        let lot = &mut *guard;
        lot.closed = true;
        let ids: Vec<u64> = lot.slots.keys().copied().collect();
        for id in ids {
            self.wake(lot, id, Wake::Ready);
        }
        lot.checks.clear();
        lot.settling.clear();
    }

    /// Acts on what the epoll set reported: an end or an error wakes its connection at once;
    /// bytes too, except on a sockmap leg: those are looked at after [`SETTLE`].
    fn events(&self, events: &Events) {
        let now = Instant::now();
        let mut guard = self.lot();
        let lot = &mut *guard;
        for event in events {
            let id = (event.token().0 / 2) as u64;
            let Some(slot) = lot.slots.get_mut(&id) else {
                continue;
            };
            if event.is_read_closed()
                || event.is_write_closed()
                || event.is_error()
                || !slot.parked.idle.signals_spuriously()
            {
                self.wake(lot, id, Wake::Ready);
            } else if !std::mem::replace(&mut slot.readable, true) {
                lot.settling.push_back((now + SETTLE, id));
            }
        }
    }

    /// When the next connection is due for a check.
    fn next_due(&self) -> Option<Instant> {
        let lot = self.lot();
        let check = lot.checks.peek().map(|Reverse((at, _))| *at);
        let settle = lot.settling.front().map(|(at, _)| *at);
        check.into_iter().chain(settle).min()
    }

    /// Checks the connections that are due (at most [`CHECKS`] of each kind): wakes those
    /// with something for the agent or idle for their timeout, and schedules the others' next
    /// check.
    fn check_due(&self) {
        let now = Instant::now();
        let mut guard = self.lot();
        let lot = &mut *guard;
        for _ in 0..CHECKS {
            match lot.settling.front() {
                Some(&(at, id)) if at <= now => {
                    lot.settling.pop_front();
                    let Some(slot) = lot.slots.get_mut(&id) else {
                        continue;
                    };
                    slot.readable = false;
                    if slot.parked.idle.has_something() {
                        self.wake(lot, id, Wake::Ready);
                    }
                }
                _ => break,
            }
        }
        for _ in 0..CHECKS {
            let Some(&Reverse((at, id))) = lot.checks.peek() else {
                break;
            };
            if at > now {
                break;
            }
            lot.checks.pop();
            let Some(slot) = lot.slots.get_mut(&id) else {
                continue;
            };
            if slot.due != at {
                continue;
            }
            if slot.idled_out(now) {
                self.wake(lot, id, Wake::Idle);
            } else {
                slot.due = slot.next_check(now);
                lot.checks.push(Reverse((slot.due, id)));
            }
        }
        // Give back what a burst of parked connections grew.
        if lot.slots.capacity() > 64 && lot.slots.capacity() > 4 * lot.slots.len() {
            lot.slots.shrink_to_fit();
        }
        if lot.checks.capacity() > 64 && lot.checks.capacity() > 4 * lot.checks.len() {
            lot.checks.shrink_to_fit();
        }
        if lot.settling.capacity() > 64 && lot.settling.capacity() > 4 * lot.settling.len() {
            lot.settling.shrink_to_fit();
        }
    }
}

/// The epoll token of leg `leg` (0 client, 1 upstream) of parked connection `id`.
fn token(id: u64, leg: usize) -> Token {
    Token(usize::try_from(id).unwrap_or(usize::MAX / 2) * 2 + leg)
}

impl Driver {
    /// Runs until the listener's accept loop ends (it drops the task); at the drain deadline
    /// it wakes every parked connection.
    pub(crate) async fn run(mut self, mut drained: Drained) {
        // However this ends (a panic included), what is parked is woken: the accept loop's
        // drain waits for every connection.
        let _close = CloseOnExit(self.parking.clone());
        let mut events = Events::with_capacity(EVENTS);
        let mut draining = false;
        loop {
            // Nothing due: sleep until something is parked.
            let due = self
                .parking
                .next_due()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                ready = self.poll.readable_mut() => {
                    let failed = match ready {
                        Ok(mut guard) => read_events(&mut guard, &mut events, &self.parking).err(),
                        Err(e) => Some(e),
                    };
                    if let Some(e) = failed {
                        tracing::error!(error = %e,
                            "reading the parked connections' epoll set failed: waking them all, parking none from now on");
                        return;
                    }
                }
                () = tokio::time::sleep_until(due) => self.parking.check_due(),
                () = self.parking.parked.notified() => {}
                _ = relay::drain_passed(&mut drained), if !draining => {
                    draining = true;
                    self.parking.close();
                }
            }
        }
    }
}

/// Wakes every parked connection when dropped.
struct CloseOnExit(Arc<Parking>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Takes what the epoll set has ready (at most [`ROUNDS`] times [`EVENTS`]); clears the
/// readiness only once it reports nothing, so nothing is missed.
fn read_events(
    guard: &mut tokio::io::unix::AsyncFdReadyMutGuard<'_, Poll>,
    events: &mut Events,
    parking: &Parking,
) -> io::Result<()> {
    for _ in 0..ROUNDS {
        match guard.get_inner_mut().poll(events, Some(Duration::ZERO)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if events.is_empty() {
            guard.clear_ready();
            return Ok(());
        }
        parking.events(events);
    }
    Ok(())
}
