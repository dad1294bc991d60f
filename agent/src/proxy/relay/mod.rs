//! Moving bytes between the client leg and the upstream leg once both are set up. Every data
//! path starts from the same value, [`Established`]: both sockets, the plan (the data path with
//! the TLS sessions it needs), and the limits. One module per data path:
//!
//! - [`ktls`]: every TLS leg's keys go to the kernel, then both directions are spliced; the
//!   payload never enters user space (control records, KeyUpdate and the record limit are
//!   handled there);
//! - [`splice`]: plain legs (passthrough) spliced through pipes borrowed from the node's pool
//!   while bytes are in flight, and the pipe loop the ktls path runs too;
//! - [`sockmap`]: plain legs in the eBPF sock hash; the kernel redirects each segment to the
//!   other leg and the agent only handles the ends;
//! - [`userspace`]: rustls keeps the record layer of every TLS leg; a copy loop moves the
//!   plaintext.
//!
//! Either way a clean end of one direction (close_notify or FIN) becomes a half-close of the
//! other leg (close_notify then FIN on a TLS leg), and the relay ends when both directions have.
//! The idle timeout watches every path the same way, from the kernel's TCP counters.

pub(crate) mod ktls;
pub(crate) mod sockmap;
pub(crate) mod splice;
pub(crate) mod userspace;

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::bpf::LoadedBpf;
use crate::handoff::TlsSession;
use crate::net::{self, Upstream};
use crate::outcome::{DataPath, Facts, Failure, Reason};
use crate::splice::PipePool;

/// The data path a connection takes, with the TLS sessions that path needs: a plan cannot
/// name a path its sessions do not fit. Sessions are boxed: a plan passes through several
/// futures on its way to its relay, and each would otherwise hold room for them inline.
pub(crate) enum Plan {
    /// Every TLS leg goes to the kernel, then both directions are spliced.
    Ktls {
        /// The client leg's session (terminate, reencrypt).
        client: Option<Box<TlsSession>>,
        /// The upstream leg's session (reencrypt, originate).
        upstream: Option<Box<TlsSession>>,
        /// When the kernel legs change keys.
        rekey: ktls::RekeyPolicy,
    },
    /// rustls keeps every TLS leg's record layer; a copy loop moves the plaintext.
    Userspace {
        /// The client leg's session, when the agent holds one.
        client: Option<Box<TlsSession>>,
        /// The upstream leg's session, when the agent holds one.
        upstream: Option<Box<TlsSession>>,
    },
    /// Plain legs spliced through pipes borrowed from the node's pool.
    Splice,
    /// Plain legs in the eBPF sock hash.
    Sockmap,
}

impl Plan {
    /// The data path this plan takes.
    pub(crate) fn path(&self) -> DataPath {
        match self {
            Plan::Ktls { .. } => DataPath::Ktls,
            Plan::Userspace { .. } => DataPath::Userspace,
            Plan::Splice => DataPath::Splice,
            Plan::Sockmap => DataPath::Sockmap,
        }
    }
}

/// A connection whose two legs are set up: what every data path starts from.
pub(crate) struct Established {
    /// The client leg.
    pub(crate) client: TcpStream,
    /// The upstream leg.
    pub(crate) upstream: Upstream,
    /// How its bytes move.
    pub(crate) plan: Plan,
    /// The listener's counter index (the sockmap verdict counts redirect failures by it).
    pub(crate) listener: u16,
    /// Closed after this long without a byte either way.
    pub(crate) idle_timeout: Duration,
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
    /// `Err` when the relay ended on a failure rather than on both sides closing.
    pub(crate) result: Result<(), Failure>,
    /// It stopped with both directions waiting for bytes and holding nothing: the connection
    /// can be parked (`result` is `Ok`).
    pub(crate) idle: bool,
    /// When a direction last had bytes, in this run (spliced paths).
    pub(crate) last_woke: Option<tokio::time::Instant>,
}

impl RelayOutcome {
    /// A relay that moved `up` and `down` bytes and ended with `result`.
    pub(crate) fn moved(up: u64, down: u64, result: Result<(), Failure>) -> Self {
        Self {
            up,
            down,
            key_updates: 0,
            tickets: 0,
            result,
            idle: false,
            last_woke: None,
        }
    }
}

/// How long both directions of a spliced connection (splice, kTLS) wait for bytes before the
/// relay stops and the connection is parked ([`crate::proxy::parking`]). Long enough that a
/// request/response connection stays on the runtime between its messages.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// How [`run`] (or [`resume`]) left a connection.
pub(crate) enum Relayed {
    /// Its relay ended with both directions closed (a failure, an idle timeout or the drain
    /// deadline is `Err`).
    Done,
    /// It waits for bytes and holds nothing but its sockets (and its kTLS legs' state): it
    /// needs no task until one of its legs has something for the agent
    /// ([`crate::proxy::parking`]); [`resume`] takes it up from there.
    Idle(IdleConn),
}

/// Moves the connection's bytes on its planned data path (splice and kTLS borrowing pipes from
/// `pipes`) until both directions end, it fails, it idles out, or the drain deadline passes
/// (`drained` says so); its counts go into `facts`. With `park_after`, a spliced connection
/// (splice, kTLS) whose directions have both waited that long for bytes comes back
/// [`Relayed::Idle`]; a sockmap connection does once its legs are in the sock hash.
pub(crate) async fn run(
    est: Box<Established>,
    bpf: Option<&LoadedBpf>,
    pipes: &PipePool,
    facts: &mut Facts,
    drained: &mut Drained,
    park_after: Option<Duration>,
) -> Result<Relayed, Failure> {
    let Established {
        client,
        upstream,
        plan,
        listener,
        idle_timeout,
    } = *est;
    let legs = match plan {
        Plan::Sockmap => {
            let entry = match (bpf, &upstream) {
                (Some(bpf), Upstream::Tcp(tcp)) => sockmap::enter(&client, tcp, bpf, listener),
                _ => {
                    return Err(Failure::new(
                        Reason::Internal,
                        "sockmap planned without the eBPF programs or with a unix upstream",
                    ));
                }
            };
            match entry {
                Ok(sockmap::Entry::Entered(pair, starts)) => {
                    let Upstream::Tcp(tcp) = upstream else {
                        return Err(Failure::new(
                            Reason::Internal,
                            "a sockmap connection with a unix upstream",
                        ));
                    };
                    // A short-lived connection ends without being parked: parking costs it
                    // two registrations each way, more than its task costs it for a second.
                    // On the heap, as its relay below: the other paths' tasks need neither.
                    // Its idle clock starts now, not when it parks; and a timeout shorter than
                    // the quiet wait is not overrun by it.
                    let entered = LastProgress::now(client.as_fd());
                    // Counted among the relays a takeover waits for, from here until it parks
                    // (and moves from the parking) or goes on to its end here (then it cannot
                    // move, and a takeover must not wait for it).
                    let pending = park_after.map(|_| crate::proxy::moving::MovePending::new());
                    if let Some(after) = park_after
                        && Box::pin(sockmap_quiet(
                            &client,
                            &tcp,
                            after.min(idle_timeout),
                            drained.clone(),
                        ))
                        .await
                    {
                        let idle =
                            IdleSockmap::new(client, tcp, pair, starts, idle_timeout, entered)?;
                        return Ok(Relayed::Idle(IdleConn::Sockmap(idle)));
                    }
                    drop(pending);
                    let legs = SockmapLegs {
                        client,
                        upstream: tcp,
                        pair,
                        starts,
                        idle_timeout,
                        last: None,
                    };
                    return Box::pin(sockmap_to_end(legs, None, facts, drained))
                        .await
                        .map(|()| Relayed::Done);
                }
                Ok(sockmap::Entry::Failed(failure)) => return Err(failure),
                // Nothing moved yet: splice instead, and say why.
                Err(why) => {
                    let (path, reason) = crate::path::sockmap_refused(&why);
                    facts.take_path(path, format!("{reason}; upstream {}", upstream.peer()));
                    (None, None)
                }
            }
        }
        Plan::Splice => (None, None),
        Plan::Ktls {
            client: c,
            upstream: u,
            rekey,
        } => ktls::into_kernel(&client, c, &upstream, u, &rekey)?,
        Plan::Userspace {
            client: c,
            upstream: u,
        } => {
            // On the heap, sized for this path alone: inline, every connection's task would
            // hold room for user-space TLS sessions whatever path it took.
            let moving = Box::pin(userspace::relay(&client, c, &upstream, u));
            let (outcome, stopped) = watch(
                moving,
                &client,
                &upstream,
                idle_timeout,
                drained,
                None,
                None,
            )
            .await;
            return ended(outcome, stopped, idle_timeout, facts).map(|()| Relayed::Done);
        }
    };
    let conn = SplicedConn {
        client,
        upstream,
        legs,
        idle_timeout,
        last: None,
    };
    // On the heap: the user-space path's connections need none of it.
    Box::pin(spliced(conn, pipes, facts, drained, park_after, None)).await
}

/// A connection on the splice path, kTLS legs included, on the runtime.
struct SplicedConn {
    client: TcpStream,
    upstream: Upstream,
    /// Its legs whose records are in the kernel, each on the heap: every connection's task
    /// holds this value whatever its path.
    legs: ktls::KernelLegs,
    idle_timeout: Duration,
    /// When it last moved a byte, when it was parked before.
    last: Option<LastProgress>,
}

/// Splices a connection until it ends, or, with `park_after`, until it is idle (then it comes
/// back [`Relayed::Idle`]). `stop_now`: it is shut down at once (see [`watch`]).
async fn spliced(
    conn: SplicedConn,
    pipes: &PipePool,
    facts: &mut Facts,
    drained: &mut Drained,
    park_after: Option<Duration>,
    stop_now: Option<Stop>,
) -> Result<Relayed, Failure> {
    let park_after = park_after.filter(|_| stop_now.is_none());
    let started = tokio::time::Instant::now();
    let (outcome, stopped) = {
        let (client, upstream) = (&conn.client, &conn.upstream);
        let (c, u) = (conn.legs.0.as_deref(), conn.legs.1.as_deref());
        // On the heap: see `run`.
        // Only a relay that may park may move: the connection moves from the parking.
        let asked = park_after.map(|_| drained.clone());
        let moving = Box::pin(ktls::relay(
            pipes, client, c, upstream, u, park_after, asked,
        ));
        let timeout = conn.idle_timeout;
        watch(
            moving, client, upstream, timeout, drained, stop_now, conn.last,
        )
        .await
    };
    let idle = stopped.is_none() && outcome.as_ref().is_some_and(|o| o.idle);
    // Its last byte: when a direction last had bytes, else as known before this run.
    let last_byte = outcome.as_ref().and_then(|o| o.last_woke);
    ended(outcome, stopped, conn.idle_timeout, facts)?;
    if idle {
        let since = last_byte.or(conn.last.map(|l| l.since)).unwrap_or(started);
        let last = LastProgress {
            progress: crate::sys::tcp_progress(conn.client.as_fd()).ok(),
            since,
        };
        let idle = IdleSpliced::new(conn, last)?;
        return Ok(Relayed::Idle(IdleConn::Spliced(Box::new(idle))));
    }
    Ok(Relayed::Done)
}

/// A connection that waits for bytes and holds nothing but its legs: off the runtime until one
/// of them has something for the agent.
pub(crate) enum IdleConn {
    /// Both legs in the sock hash.
    Sockmap(IdleSockmap),
    /// A spliced connection (splice, kTLS) whose two directions waited for bytes.
    Spliced(Box<IdleSpliced>),
}

impl IdleConn {
    /// The client leg's descriptor, then the upstream leg's.
    pub(crate) fn fds(&self) -> [BorrowedFd<'_>; 2] {
        match self {
            IdleConn::Sockmap(s) => [s.client.as_fd(), s.upstream.as_fd()],
            IdleConn::Spliced(s) => [s.client.as_fd(), s.upstream.as_fd()],
        }
    }

    /// Closed after this long without a byte either way.
    pub(crate) fn idle_timeout(&self) -> Duration {
        match self {
            IdleConn::Sockmap(s) => s.idle_timeout,
            IdleConn::Spliced(s) => s.idle_timeout,
        }
    }

    /// When it last moved a byte.
    pub(crate) fn last_progress(&self) -> LastProgress {
        match self {
            IdleConn::Sockmap(s) => s.last,
            IdleConn::Spliced(s) => s.last,
        }
    }

    /// Records when it last moved a byte (seen while parked).
    pub(crate) fn set_last_progress(&mut self, last: LastProgress) {
        match self {
            IdleConn::Sockmap(s) => s.last = last,
            IdleConn::Spliced(s) => s.last = last,
        }
    }

    /// Whether a leg that signalled readable must be looked at before the connection is
    /// woken: a sockmap leg signals for bytes the verdict then redirects, a spliced leg only
    /// for bytes (or an end) the agent must move.
    pub(crate) fn signals_spuriously(&self) -> bool {
        matches!(self, IdleConn::Sockmap(_))
    }

    /// Whether a leg has bytes for the agent, its end or an error (a sockmap leg, after it
    /// signalled readable).
    pub(crate) fn has_something(&self) -> bool {
        match self {
            IdleConn::Sockmap(s) => s.has_something(),
            IdleConn::Spliced(_) => true,
        }
    }
}

/// A parked connection's legs as they travel to a new agent at a takeover.
pub(crate) struct MovingLegs {
    /// The client leg.
    pub(crate) client: std::os::fd::OwnedFd,
    /// The upstream leg.
    pub(crate) upstream: std::os::fd::OwnedFd,
    /// The upstream leg is a unix socket.
    pub(crate) upstream_unix: bool,
    /// The client leg's kTLS state.
    pub(crate) client_leg: Option<crate::takeover::LegRecord>,
    /// The upstream leg's kTLS state.
    pub(crate) upstream_leg: Option<crate::takeover::LegRecord>,
    /// A sockmap connection's entries in the shared maps.
    pub(crate) sockmap: Option<crate::takeover::SockmapRecord>,
    /// How long it has moved nothing either way.
    pub(crate) idle_for: Duration,
}

impl IdleConn {
    /// Whether it can move to a new agent: a spliced connection (kTLS, splice) is its sockets
    /// and the small state of its kTLS legs; a sockmap connection, when the new agent adopted
    /// the maps its sock hash entries are in (`sockmap`).
    pub(crate) fn can_move(&self, sockmap: bool) -> bool {
        match self {
            IdleConn::Spliced(_) => true,
            IdleConn::Sockmap(_) => sockmap,
        }
    }

    /// Its legs as they travel to a new agent, or itself when it cannot move.
    pub(crate) fn into_moving(self) -> Result<MovingLegs, IdleConn> {
        let spliced = match self {
            IdleConn::Spliced(spliced) => spliced,
            IdleConn::Sockmap(s) => {
                return Ok(MovingLegs {
                    sockmap: Some(crate::takeover::SockmapRecord {
                        cookies: s.keys.cookies(),
                        send_starts: s.starts.to_pair(),
                    }),
                    client: s.client.into(),
                    upstream: s.upstream.into(),
                    upstream_unix: false,
                    client_leg: None,
                    upstream_leg: None,
                    idle_for: s.last.since.elapsed(),
                });
            }
        };
        let records = [spliced.legs.0.as_deref(), spliced.legs.1.as_deref()]
            .map(|leg| leg.map(ktls::KtlsLeg::to_record).transpose());
        let [Ok(client_leg), Ok(upstream_leg)] = records else {
            return Err(IdleConn::Spliced(spliced));
        };
        let IdleSpliced {
            client,
            upstream,
            last,
            ..
        } = *spliced;
        let (upstream, upstream_unix) = match upstream {
            IdleUpstream::Tcp(s) => (std::os::fd::OwnedFd::from(s), false),
            IdleUpstream::Unix(s) => (std::os::fd::OwnedFd::from(s), true),
        };
        Ok(MovingLegs {
            client: client.into(),
            upstream,
            upstream_unix,
            client_leg,
            upstream_leg,
            sockmap: None,
            idle_for: last.since.elapsed(),
        })
    }

    /// The keys of a sockmap connection (to count it out of this agent when it moves).
    pub(crate) fn sockmap_keys(&self) -> Option<&crate::bpf::SockmapKeys> {
        match self {
            IdleConn::Sockmap(s) => Some(&s.keys),
            IdleConn::Spliced(_) => None,
        }
    }

    /// A connection handed over by the agent before this one, parked as it was there: its
    /// kTLS legs (if any) on the kernel state their sockets carry.
    pub(crate) fn moved(
        legs: MovingLegs,
        idle_timeout: Duration,
        rekey: &ktls::RekeyPolicy,
        bpf: Option<&LoadedBpf>,
    ) -> std::io::Result<Self> {
        let client = std::net::TcpStream::from(legs.client);
        client.set_nonblocking(true)?;
        let now = tokio::time::Instant::now();
        let last = LastProgress {
            progress: crate::sys::tcp_progress(client.as_fd()).ok(),
            since: now.checked_sub(legs.idle_for).unwrap_or(now),
        };
        if let Some(sockmap) = legs.sockmap {
            // Its entries are in the maps this agent adopted.
            let bpf = bpf.filter(|b| b.adopted()).ok_or_else(|| {
                std::io::Error::other(
                    "a sockmap connection, and this agent did not adopt the maps it is in",
                )
            })?;
            let upstream = std::net::TcpStream::from(legs.upstream);
            upstream.set_nonblocking(true)?;
            return Ok(IdleConn::Sockmap(IdleSockmap {
                client,
                upstream,
                keys: bpf.sockmap_moved_in(sockmap.cookies),
                starts: sockmap::SendStarts::from_pair(sockmap.send_starts),
                idle_timeout,
                last,
            }));
        }
        let upstream = if legs.upstream_unix {
            let s = std::os::unix::net::UnixStream::from(legs.upstream);
            s.set_nonblocking(true)?;
            IdleUpstream::Unix(s)
        } else {
            let s = std::net::TcpStream::from(legs.upstream);
            s.set_nonblocking(true)?;
            IdleUpstream::Tcp(s)
        };
        let leg = |r: &Option<crate::takeover::LegRecord>| {
            r.as_ref()
                .map(|r| Box::new(ktls::KtlsLeg::from_record(r, rekey)))
        };
        Ok(IdleConn::Spliced(Box::new(IdleSpliced {
            client,
            upstream,
            legs: (leg(&legs.client_leg), leg(&legs.upstream_leg)),
            idle_timeout,
            last,
        })))
    }
}

/// A sockmap connection whose legs are in the sock hash, off the runtime until one of them has
/// something for the agent (bytes the verdict passed up, an end, an error): its two plain
/// sockets, the keys of their map entries, and where their send sequences started.
pub(crate) struct IdleSockmap {
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
    keys: crate::bpf::SockmapKeys,
    starts: sockmap::SendStarts,
    idle_timeout: Duration,
    /// When it last moved a byte (from when it entered the sock hash).
    last: LastProgress,
}

impl IdleSockmap {
    /// Whether a leg has bytes for the agent (ones the verdict passed up), its end or an
    /// error.
    fn has_something(&self) -> bool {
        // A leg that cannot be asked is taken up: its relay will see why.
        [self.client.as_fd(), self.upstream.as_fd()]
            .into_iter()
            .any(|leg| crate::sys::has_input(leg).unwrap_or(true))
    }

    /// Takes both legs off the runtime (their readiness registrations freed) and lets go of
    /// the pair, which stays in the maps.
    fn new(
        client: TcpStream,
        upstream: TcpStream,
        pair: crate::bpf::SockmapPair<'_>,
        starts: sockmap::SendStarts,
        idle_timeout: Duration,
        entered: LastProgress,
    ) -> Result<Self, Failure> {
        // On failure the pair, dropped, takes both legs out of the maps.
        let client = off_runtime(client.into_std(), "client")?;
        let upstream = off_runtime(upstream.into_std(), "upstream")?;
        Ok(Self {
            client,
            upstream,
            keys: pair.into_keys(),
            starts,
            idle_timeout,
            last: entered,
        })
    }
}

/// A spliced connection (splice, kTLS) whose two directions waited for bytes: its sockets off
/// the runtime, and its kTLS legs' state (KeyUpdate, tickets, record counts).
pub(crate) struct IdleSpliced {
    client: std::net::TcpStream,
    upstream: IdleUpstream,
    legs: ktls::KernelLegs,
    idle_timeout: Duration,
    last: LastProgress,
}

/// The upstream leg of an idle spliced connection.
enum IdleUpstream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl AsFd for IdleUpstream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            IdleUpstream::Tcp(s) => s.as_fd(),
            IdleUpstream::Unix(s) => s.as_fd(),
        }
    }
}

impl IdleSpliced {
    /// Takes both legs off the runtime (their readiness registrations freed).
    fn new(conn: SplicedConn, last: LastProgress) -> Result<Self, Failure> {
        let upstream = match conn.upstream {
            Upstream::Tcp(s) => IdleUpstream::Tcp(off_runtime(s.into_std(), "upstream")?),
            Upstream::Unix(s) => IdleUpstream::Unix(off_runtime(s.into_std(), "upstream")?),
        };
        Ok(Self {
            client: off_runtime(conn.client.into_std(), "client")?,
            upstream,
            legs: conn.legs,
            idle_timeout: conn.idle_timeout,
            last,
        })
    }

    /// Both legs back on the runtime.
    fn on_runtime(self) -> Result<SplicedConn, Failure> {
        let upstream = match self.upstream {
            IdleUpstream::Tcp(s) => Upstream::Tcp(on_runtime(TcpStream::from_std(s), "upstream")?),
            IdleUpstream::Unix(s) => {
                Upstream::Unix(on_runtime(tokio::net::UnixStream::from_std(s), "upstream")?)
            }
        };
        Ok(SplicedConn {
            client: on_runtime(TcpStream::from_std(self.client), "client")?,
            upstream,
            legs: self.legs,
            idle_timeout: self.idle_timeout,
            last: Some(self.last),
        })
    }
}

/// A leg taken off the runtime, or why it could not be.
fn off_runtime<S>(taken: std::io::Result<S>, leg: &str) -> Result<S, Failure> {
    taken.map_err(|e| Failure::io(&format!("taking the {leg} leg off the runtime"), &e))
}

/// A parked leg taken back onto the runtime, or why it could not be.
fn on_runtime<S>(back: std::io::Result<S>, leg: &str) -> Result<S, Failure> {
    back.map_err(|e| Failure::io(&format!("taking the parked {leg} leg back"), &e))
}

/// Why a parked connection is taken up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// One of its legs has something for the agent (bytes, an end, an error), or the drain
    /// deadline passed (the relay sees that itself).
    Ready,
    /// Nothing moved either way for its idle timeout: it is closed as any idle connection.
    Idle,
}

/// Takes a parked connection back onto the runtime and relays it as [`run`] would have: a
/// spliced one may come back idle again.
pub(crate) async fn resume(
    idle: IdleConn,
    bpf: Option<&LoadedBpf>,
    pipes: &PipePool,
    wake: Wake,
    facts: &mut Facts,
    drained: &mut Drained,
    park_after: Option<Duration>,
) -> Result<Relayed, Failure> {
    let stop_now = (wake == Wake::Idle).then_some(Stop::Idle);
    match idle {
        IdleConn::Sockmap(idle) => {
            let may_park = park_after.is_some();
            resume_sockmap(idle, bpf, stop_now, facts, drained, may_park).await
        }
        IdleConn::Spliced(idle) => {
            let conn = idle.on_runtime()?;
            spliced(conn, pipes, facts, drained, park_after, stop_now).await
        }
    }
}

/// Whether both legs of a sockmap connection had nothing for the agent (no bytes the verdict
/// passed up, no end, no error) for `after`, or a takeover asks connections to move before
/// that: then it is parked (and moves from the parking; whatever a leg holds for the agent
/// waits in its receive queue). Reads nothing: a leg that signals readable is only asked
/// ([`crate::sys::has_input`]), since the verdict's redirects wake readers too.
async fn sockmap_quiet(
    client: &TcpStream,
    upstream: &TcpStream,
    after: Duration,
    mut moving: Drained,
) -> bool {
    let quiet_until = tokio::time::sleep(after);
    tokio::pin!(quiet_until);
    // Clears a leg's readiness when it has nothing after all; `Ok`: it has something.
    let asked = |leg: &TcpStream| {
        leg.try_io(
            tokio::io::Interest::READABLE,
            || match crate::sys::has_input(leg.as_fd()) {
                Ok(false) => Err(std::io::ErrorKind::WouldBlock.into()),
                Ok(true) | Err(_) => Ok(()),
            },
        )
    };
    loop {
        let leg = tokio::select! {
            biased;
            r = client.readable() => r.map(|()| client),
            r = upstream.readable() => r.map(|()| upstream),
            () = &mut quiet_until => return true,
            () = move_asked(&mut moving) => return true,
        };
        match leg {
            Ok(leg) if asked(leg).is_err() => {}
            _ => return false,
        }
    }
}

/// A sockmap connection on the runtime, both legs in the sock hash.
struct SockmapLegs<'a> {
    client: TcpStream,
    upstream: TcpStream,
    pair: crate::bpf::SockmapPair<'a>,
    starts: sockmap::SendStarts,
    idle_timeout: Duration,
    /// When it last moved a byte, when it was parked before.
    last: Option<LastProgress>,
}

/// Relays a sockmap connection to its end (shut down at once when `stop_now` says why).
async fn sockmap_to_end(
    legs: SockmapLegs<'_>,
    stop_now: Option<Stop>,
    facts: &mut Facts,
    drained: &mut Drained,
) -> Result<(), Failure> {
    let SockmapLegs {
        client,
        upstream,
        pair,
        starts,
        idle_timeout,
        last,
    } = legs;
    let moving = Box::pin(sockmap::finish(&client, &upstream, pair, starts));
    let (outcome, stopped) = watch(
        moving,
        &client,
        &upstream,
        idle_timeout,
        drained,
        stop_now,
        last,
    )
    .await;
    ended(outcome, stopped, idle_timeout, facts)
}

/// Takes a parked sockmap connection back onto the runtime and relays it to its end; with
/// `may_park`, one taken up with nothing for the agent is parked again.
async fn resume_sockmap(
    idle: IdleSockmap,
    bpf: Option<&LoadedBpf>,
    stop_now: Option<Stop>,
    facts: &mut Facts,
    drained: &mut Drained,
    may_park: bool,
) -> Result<Relayed, Failure> {
    // Taken up with nothing for the agent (one a takeover handed over; the parking wakes a
    // sockmap connection only for something): parked again at once, the kernel moving its
    // bytes meanwhile.
    if may_park && stop_now.is_none() && !idle.has_something() {
        return Ok(Relayed::Idle(IdleConn::Sockmap(idle)));
    }
    let IdleSockmap {
        client,
        upstream,
        keys,
        starts,
        idle_timeout,
        last,
    } = idle;
    let Some(bpf) = bpf else {
        return Err(Failure::new(
            Reason::Internal,
            "a parked sockmap connection without the eBPF programs",
        ));
    };
    // Dropped on any failure below, taking both legs out of the maps.
    let pair = bpf.sockmap_pair_again(keys);
    let legs = SockmapLegs {
        client: on_runtime(TcpStream::from_std(client), "client")?,
        upstream: on_runtime(TcpStream::from_std(upstream), "upstream")?,
        pair,
        starts,
        idle_timeout,
        last: Some(last),
    };
    sockmap_to_end(legs, stop_now, facts, drained)
        .await
        .map(|()| Relayed::Done)
}

/// A relay's end as the connection's: its counts into `facts`, and why the agent stopped it,
/// if it did, over how the relay itself ended. `None`: dropped after the grace.
fn ended(
    outcome: Option<RelayOutcome>,
    stopped: Option<Stop>,
    idle_timeout: Duration,
    facts: &mut Facts,
) -> Result<(), Failure> {
    let Some(outcome) = outcome else {
        return Err(match stopped {
            Some(Stop::Drained(deadline)) => drain_deadline(deadline),
            _ => idle_timeout_failure(idle_timeout),
        });
    };
    // A connection parked and woken runs its relay more than once: bytes add up, while the
    // kTLS legs keep their own counts across runs.
    facts.bytes_up += outcome.up;
    facts.bytes_down += outcome.down;
    facts.key_updates = outcome.key_updates;
    facts.tickets = outcome.tickets;
    match stopped {
        None => outcome.result,
        Some(Stop::Idle) => Err(idle_timeout_failure(idle_timeout)),
        Some(Stop::Drained(deadline)) => Err(drain_deadline(deadline)),
    }
}

/// The failure of a connection closed for idling `timeout`.
fn idle_timeout_failure(timeout: Duration) -> Failure {
    Failure::new(
        Reason::IdleTimeout,
        format!(
            "no byte either way for {} ms (idle_timeout_ms): closed",
            timeout.as_millis()
        ),
    )
}

/// What a listener tells its connections (and what the proxy tells a listener).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Signal {
    /// The drain deadline, once it has passed (or, to a listener, once it is told to stop).
    pub(crate) deadline: Option<Duration>,
    /// A new agent took over: connections that can move stop where they hold nothing but
    /// their sockets ([`splice::relay`]) and are handed to it ([`crate::proxy::parking`]).
    pub(crate) move_out: bool,
}

/// Tells a connection that the drain deadline has passed, or that it is asked to move.
pub(crate) type Drained = tokio::sync::watch::Receiver<Signal>;

/// Resolves once the drain deadline has passed, with the deadline; never when none will.
pub(crate) async fn drain_passed(drained: &mut Drained) -> Duration {
    loop {
        if let Some(deadline) = drained.borrow_and_update().deadline {
            return deadline;
        }
        if drained.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// [`move_asked`] on `drained` when there is one; never otherwise.
pub(crate) async fn move_asked_if(drained: Option<&mut Drained>) {
    match drained {
        Some(d) => move_asked(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves once connections are asked to move to a new agent; never when they will not be.
pub(crate) async fn move_asked(drained: &mut Drained) {
    loop {
        if drained.borrow_and_update().move_out {
            return;
        }
        if drained.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The failure of a connection still open at the drain deadline.
pub(crate) fn drain_deadline(deadline: Duration) -> Failure {
    Failure::new(
        Reason::DrainDeadline,
        format!(
            "still open at the drain deadline ({} ms): closed",
            deadline.as_millis()
        ),
    )
}

/// Why the agent stopped a relay.
enum Stop {
    /// Nothing moved for the idle timeout.
    Idle,
    /// The drain deadline passed.
    Drained(Duration),
}

/// How long a relay the agent shut down (idle, drain deadline) may take to end by itself.
const GRACE: Duration = Duration::from_secs(2);

/// Runs `relay` to its end (shut down at once when `stop_now` says why), closing the
/// connection when nothing has moved either way on the client leg for `timeout` (read from the
/// kernel's TCP counters, so every data path is seen the same, in-kernel ones included) or
/// when the drain deadline passes. Closing is a shutdown
/// of both legs, so the relay ends on its own and still reports its bytes; one that has not
/// ended [`GRACE`] after the shutdown is dropped (`None`). Returns its outcome, and why the
/// agent stopped it, if it did.
async fn watch<F: Future>(
    relay: F,
    client: &TcpStream,
    upstream: &impl AsFd,
    timeout: Duration,
    drained: &mut Drained,
    stop_now: Option<Stop>,
    from: Option<LastProgress>,
) -> (Option<F::Output>, Option<Stop>) {
    let poll = (timeout / 4).clamp(Duration::from_millis(25), Duration::from_secs(5));
    tokio::pin!(relay);
    let progress = || crate::sys::tcp_progress(client.as_fd()).ok();
    let LastProgress {
        progress: mut last,
        mut since,
    } = from.unwrap_or_else(|| LastProgress::now(client.as_fd()));
    let stop = |why| {
        let _ = net::shutdown_both(client);
        let _ = net::shutdown_both(upstream);
        Some(why)
    };
    let mut stopped = stop_now.and_then(stop);
    while stopped.is_none() {
        tokio::select! {
            out = &mut relay => return (Some(out), stopped),
            () = tokio::time::sleep(poll), if stopped.is_none() => {
                let now = progress();
                if now != last {
                    last = now;
                    since = tokio::time::Instant::now();
                } else if since.elapsed() >= timeout {
                    stopped = stop(Stop::Idle);
                }
            }
            deadline = drain_passed(drained), if stopped.is_none() => {
                stopped = stop(Stop::Drained(deadline));
            }
        }
    }
    let out = tokio::time::timeout(GRACE, &mut relay).await.ok();
    (out, stopped)
}

/// When a connection last moved a byte either way, by the kernel's TCP progress on its client
/// leg: carried across parks, so its idle timeout counts from its last byte, not from when it
/// last woke or parked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LastProgress {
    /// The client leg's progress (bytes received and acknowledged) when last read.
    pub(crate) progress: Option<u64>,
    /// When it last changed.
    pub(crate) since: tokio::time::Instant,
}

impl LastProgress {
    /// The progress of `client` now.
    pub(crate) fn now(client: BorrowedFd<'_>) -> Self {
        Self {
            progress: crate::sys::tcp_progress(client).ok(),
            since: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::proxy::state::{ListenerState, SharedLimits};

    /// A connected pair of loopback TCP sockets on the current runtime.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// What each connection holds, in bytes: the task's future (`connection::serve`), and on
    /// the heap the one data path's relay future; or, parked, its record. Inline, a connection
    /// would carry its handshake's and the largest path's state (user-space TLS sessions)
    /// whatever path it took; these bounds keep it from creeping back.
    #[tokio::test]
    async fn connection_futures_stay_small() {
        let config = crate::config::Config::parse(
            "[[listener]]\nname = \"p\"\nmode = \"passthrough\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"127.0.0.1:1\"\n",
            std::path::Path::new("test.toml"),
        )
        .unwrap();
        let limits = SharedLimits::new(&config.limits);
        let telemetry = Arc::new(crate::metrics::Telemetry::memory(
            Default::default(),
            "test".into(),
        ));
        let state = ListenerState::new(
            &config.listeners[0],
            Arc::new(crate::path::KernelCaps::probe()),
            None,
            0,
            telemetry,
            limits.clone(),
        )
        .unwrap();
        let (client, _peer) = pair().await;
        let (upstream, _far) = pair().await;
        let upstream = Upstream::Tcp(upstream);
        let pipes = PipePool::new(2, 4096);
        let (_tx, drained) = tokio::sync::watch::channel(Signal::default());
        let addr = client.peer_addr().unwrap();
        let park = Some(PARK_AFTER);
        let sizes = [
            (
                "spliced relay (splice, ktls)",
                size_of_val(&ktls::relay(
                    &pipes,
                    &client,
                    None,
                    &upstream,
                    None,
                    park,
                    Some(drained.clone()),
                )),
                // Held only while bytes move (a parked connection has none); the move-out at
                // a takeover (its select branch and the directions' wait) took it past 1536.
                1920,
            ),
            (
                // One per TLS leg, on the heap and kept while the connection is parked: its
                // session (rustls' state for KeyUpdate and tickets) and its record counts.
                // jemalloc's size class above 640 bytes is 768.
                "ktls leg",
                size_of::<ktls::KtlsLeg>(),
                640,
            ),
            (
                "userspace relay",
                size_of_val(&userspace::relay(&client, None, &upstream, None)),
                1024,
            ),
            (
                // Its kTLS legs and its facts' text on the heap beside it.
                "parked connection",
                size_of::<crate::proxy::parking::Parked>(),
                384,
            ),
        ];
        let sources = Arc::new(crate::proxy::sources::SourceTable::default());
        let admission = state.admit(&sources, addr).unwrap();
        let state = Arc::new(state);
        let task = crate::proxy::connection::serve(state, admission, client, addr, drained, None);
        let task_size = size_of_val(&task);
        drop(task);
        for (what, bytes, bound) in sizes.iter().chain([&("connection task", task_size, 1536)]) {
            println!("{what}: {bytes} bytes (bound {bound})");
        }
        for (what, bytes, bound) in sizes.iter().chain([&("connection task", task_size, 1536)]) {
            assert!(bytes <= bound, "{what}: {bytes} bytes, over {bound}");
        }
    }
}
