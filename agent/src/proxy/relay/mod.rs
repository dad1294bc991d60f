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

use std::os::fd::AsFd;
use std::pin::Pin;
use std::time::Duration;

use rustls::Connection;
use tokio::net::TcpStream;

use crate::bpf::LoadedBpf;
use crate::handoff::KernelBound;
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
        client: Option<Box<KernelBound>>,
        /// The upstream leg's session (reencrypt, originate).
        upstream: Option<Box<KernelBound>>,
        /// When the kernel legs change keys.
        rekey: ktls::RekeyPolicy,
    },
    /// rustls keeps every TLS leg's record layer; a copy loop moves the plaintext.
    Userspace {
        /// The client leg's session, when the agent holds one.
        client: Option<Box<Connection>>,
        /// The upstream leg's session, when the agent holds one.
        upstream: Option<Box<Connection>>,
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
}

impl RelayOutcome {
    /// A relay that could not start.
    pub(crate) fn failed(failure: Failure) -> Self {
        Self::moved(0, 0, Err(failure))
    }

    /// A relay that moved `up` and `down` bytes and ended with `result`.
    pub(crate) fn moved(up: u64, down: u64, result: Result<(), Failure>) -> Self {
        Self {
            up,
            down,
            key_updates: 0,
            tickets: 0,
            result,
        }
    }
}

/// How [`run`] left a connection.
pub(crate) enum Relayed {
    /// Its relay ended with both directions closed (a failure, an idle timeout or the drain
    /// deadline is `Err`).
    Done,
    /// Both legs are in the sock hash: the kernel moves its bytes, and until one of its legs
    /// has something for the agent it needs no task ([`crate::proxy::parking`]); [`resume`]
    /// takes it up from there.
    Idle(IdleSockmap),
}

/// Moves the connection's bytes on its planned data path (splice and kTLS borrowing pipes from
/// `pipes`) until both directions end, it fails, it idles out, or the drain deadline passes
/// (`drained` says so); its counts go into `facts`. A sockmap connection comes back
/// [`Relayed::Idle`] once its legs are in the sock hash.
pub(crate) async fn run(
    est: Box<Established>,
    bpf: Option<&LoadedBpf>,
    pipes: &PipePool,
    facts: &mut Facts,
    drained: &mut Drained,
) -> Result<Relayed, Failure> {
    let Established {
        client,
        upstream,
        plan,
        listener,
        idle_timeout,
    } = *est;
    let plan = match plan {
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
                    let idle = IdleSockmap::new(client, upstream, pair, starts, idle_timeout)?;
                    return Ok(Relayed::Idle(idle));
                }
                Ok(sockmap::Entry::Failed(failure)) => return Err(failure),
                // Nothing moved yet: splice instead, and say why.
                Err(why) => {
                    let (path, reason) = crate::path::sockmap_refused(&why);
                    facts.take_path(path, format!("{reason}; upstream {}", upstream.peer()));
                    Plan::Splice
                }
            }
        }
        plan => plan,
    };
    let (client, upstream) = (&client, &upstream);
    // Each data path's future on the heap, sized for that path alone: inline, every
    // connection's task would be as large as the largest path's (user-space TLS sessions and
    // buffers), for the whole life of the connection.
    let moving: Pin<Box<dyn Future<Output = RelayOutcome> + Send + '_>> = match plan {
        Plan::Ktls {
            client: c,
            upstream: u,
            rekey,
        } => Box::pin(ktls::relay(pipes, client, c, upstream, u, rekey)),
        Plan::Userspace {
            client: c,
            upstream: u,
        } => Box::pin(userspace::relay(client, c, upstream, u)),
        // A sockmap plan got here only when its legs could not enter the sock hash.
        Plan::Splice | Plan::Sockmap => Box::pin(splice::relay_plain(pipes, client, upstream)),
    };
    let (outcome, stopped) = watch(moving, client, upstream, idle_timeout, drained, None).await;
    ended(outcome, stopped, idle_timeout, facts).map(|()| Relayed::Done)
}

/// A sockmap connection whose legs are in the sock hash, off the runtime until one of them has
/// something for the agent (bytes the verdict passed up, an end, an error): its two plain
/// sockets, the keys of their map entries, and where their send sequences started.
pub(crate) struct IdleSockmap {
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
    keys: crate::bpf::SockmapKeys,
    starts: sockmap::SendStarts,
    /// Closed after this long without a byte either way.
    pub(crate) idle_timeout: Duration,
}

impl IdleSockmap {
    /// Takes both legs off the runtime (their readiness registrations freed) and lets go of
    /// the pair, which stays in the maps.
    fn new(
        client: TcpStream,
        upstream: Upstream,
        pair: crate::bpf::SockmapPair<'_>,
        starts: sockmap::SendStarts,
        idle_timeout: Duration,
    ) -> Result<Self, Failure> {
        let Upstream::Tcp(upstream) = upstream else {
            return Err(Failure::new(
                Reason::Internal,
                "a sockmap connection with a unix upstream",
            ));
        };
        let off = |sock: TcpStream, leg: &str| {
            sock.into_std()
                .map_err(|e| Failure::io(&format!("taking the {leg} leg off the runtime"), &e))
        };
        // On failure the pair, dropped, takes both legs out of the maps.
        let client = off(client, "client")?;
        let upstream = off(upstream, "upstream")?;
        Ok(Self {
            client,
            upstream,
            keys: pair.into_keys(),
            starts,
            idle_timeout,
        })
    }

    /// The client leg, then the upstream leg.
    pub(crate) fn legs(&self) -> [&std::net::TcpStream; 2] {
        [&self.client, &self.upstream]
    }
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

/// Takes a parked sockmap connection back onto the runtime and relays it to its end, as
/// [`run`] would have.
pub(crate) async fn resume(
    idle: IdleSockmap,
    bpf: Option<&LoadedBpf>,
    wake: Wake,
    facts: &mut Facts,
    drained: &mut Drained,
) -> Result<(), Failure> {
    let IdleSockmap {
        client,
        upstream,
        keys,
        starts,
        idle_timeout,
    } = idle;
    let Some(bpf) = bpf else {
        return Err(Failure::new(
            Reason::Internal,
            "a parked sockmap connection without the eBPF programs",
        ));
    };
    // Dropped on any failure below, taking both legs out of the maps.
    let pair = bpf.sockmap_pair_again(keys);
    let on = |sock: std::net::TcpStream, leg: &str| {
        TcpStream::from_std(sock)
            .map_err(|e| Failure::io(&format!("taking the parked {leg} leg back"), &e))
    };
    let client = on(client, "client")?;
    let upstream = on(upstream, "upstream")?;
    let moving = Box::pin(sockmap::finish(&client, &upstream, pair, starts));
    let stop = (wake == Wake::Idle).then_some(Stop::Idle);
    let (outcome, stopped) = watch(moving, &client, &upstream, idle_timeout, drained, stop).await;
    ended(outcome, stopped, idle_timeout, facts)
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
    facts.bytes_up = outcome.up;
    facts.bytes_down = outcome.down;
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

/// Tells a connection that the drain deadline has passed: `Some(deadline)` from then on.
pub(crate) type Drained = tokio::sync::watch::Receiver<Option<Duration>>;

/// Resolves once the drain deadline has passed, with the deadline; never when none will.
pub(crate) async fn drain_passed(drained: &mut Drained) -> Duration {
    loop {
        if let Some(deadline) = *drained.borrow_and_update() {
            return deadline;
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
) -> (Option<F::Output>, Option<Stop>) {
    let poll = (timeout / 4).clamp(Duration::from_millis(25), Duration::from_secs(5));
    tokio::pin!(relay);
    let progress = || crate::sys::tcp_progress(client.as_fd()).ok();
    let mut last = progress();
    let mut since = tokio::time::Instant::now();
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

    /// What each connection's task holds for its whole life, in bytes: the task's future
    /// (`connection::serve`), and on the heap the one data path's relay future. Inline, a
    /// connection would carry its handshake's and the largest path's state (user-space TLS
    /// sessions) whatever path it took; these bounds keep it from creeping back.
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
        let rekey = ktls::RekeyPolicy {
            kernel: Ok(()),
            after_records: None,
        };
        let (_tx, drained) = tokio::sync::watch::channel(None);
        let addr = client.peer_addr().unwrap();
        let sizes = [
            (
                "splice relay",
                size_of_val(&splice::relay_plain(&pipes, &client, &upstream)),
                1024,
            ),
            (
                "ktls relay",
                // Two kernel sessions (rustls' state for KeyUpdate and tickets) and the splices.
                size_of_val(&ktls::relay(&pipes, &client, None, &upstream, None, rekey)),
                2560,
            ),
            (
                "userspace relay",
                size_of_val(&userspace::relay(&client, None, &upstream, None)),
                1024,
            ),
        ];
        let admission = state.admit().unwrap();
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
