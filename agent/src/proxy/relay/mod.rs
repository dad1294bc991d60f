//! Moving bytes between the client leg and the upstream leg once both are set up. Every data
//! path starts from the same value, [`Established`]: both sockets, the plan (the data path with
//! the TLS sessions it needs), and the limits. One module per data path:
//!
//! - [`ktls`]: every TLS leg's keys go to the kernel, then both directions are spliced; the
//!   payload never enters user space (control records, KeyUpdate and the record limit are
//!   handled there);
//! - [`splice`]: plain legs (passthrough) spliced through a pipe per direction, and the pipe
//!   loop the ktls path runs too;
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
use std::time::Duration;

use rustls::Connection;
use tokio::net::TcpStream;

use crate::bpf::LoadedBpf;
use crate::handoff::KernelBound;
use crate::net::{self, Upstream};
use crate::outcome::{DataPath, Facts, Failure, Reason};

/// The data path a connection takes, with the TLS sessions that path needs: a plan cannot
/// name a path its sessions do not fit.
pub(crate) enum Plan {
    /// Every TLS leg goes to the kernel, then both directions are spliced.
    Ktls {
        /// The client leg's session (terminate, reencrypt).
        client: Option<KernelBound>,
        /// The upstream leg's session (reencrypt, originate).
        upstream: Option<KernelBound>,
        /// When the kernel legs change keys.
        rekey: ktls::RekeyPolicy,
    },
    /// rustls keeps every TLS leg's record layer; a copy loop moves the plaintext.
    Userspace {
        /// The client leg's session, when the agent holds one.
        client: Option<Connection>,
        /// The upstream leg's session, when the agent holds one.
        upstream: Option<Connection>,
    },
    /// Plain legs spliced through a pipe per direction.
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

/// Moves the connection's bytes on its planned data path until both directions end, it fails,
/// it idles out, or the drain deadline passes (`drained` says so); its counts go into `facts`.
pub(crate) async fn run(
    est: Established,
    bpf: Option<&LoadedBpf>,
    facts: &mut Facts,
    drained: &mut Drained,
) -> Result<(), Failure> {
    let Established {
        client,
        upstream,
        plan,
        listener,
        idle_timeout,
    } = est;
    let (client, upstream) = (&client, &upstream);
    let mut path_change = None;
    let moving = async {
        match plan {
            Plan::Ktls {
                client: c,
                upstream: u,
                rekey,
            } => ktls::relay(client, c, upstream, u, &rekey).await,
            Plan::Userspace {
                client: c,
                upstream: u,
            } => userspace::relay(client, c, upstream, u).await,
            Plan::Splice => splice::relay_plain(client, upstream).await,
            Plan::Sockmap => {
                let (Some(bpf), Upstream::Tcp(tcp)) = (bpf, upstream) else {
                    return RelayOutcome::failed(Failure::new(
                        Reason::Internal,
                        "sockmap planned without the eBPF programs or with a unix upstream",
                    ));
                };
                match sockmap::relay(client, tcp, bpf, listener).await {
                    Ok(outcome) => outcome,
                    // Nothing moved yet: splice instead, and say why.
                    Err(why) => {
                        let (path, reason) = crate::path::sockmap_refused(&why);
                        let to = tcp
                            .peer_addr()
                            .map_or_else(|e| e.to_string(), |a| a.to_string());
                        path_change = Some((path, format!("{reason}; upstream {to}")));
                        splice::relay_plain(client, upstream).await
                    }
                }
            }
        }
    };
    let (outcome, stopped) = watch(moving, client, upstream, idle_timeout, drained).await;
    if let Some((path, why)) = path_change {
        facts.take_path(path, why);
    }
    facts.bytes_up = outcome.up;
    facts.bytes_down = outcome.down;
    facts.key_updates = outcome.key_updates;
    facts.tickets = outcome.tickets;
    match stopped {
        None => outcome.result,
        Some(Stop::Idle) => Err(Failure::new(
            Reason::IdleTimeout,
            format!(
                "no byte either way for {} ms (idle_timeout_ms): closed",
                idle_timeout.as_millis()
            ),
        )),
        Some(Stop::Drained(deadline)) => Err(drain_deadline(deadline)),
    }
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

/// Runs `relay` to its end, closing the connection when nothing has moved either way on the
/// client leg for `timeout` (read from the kernel's TCP counters, so every data path is seen
/// the same, in-kernel ones included) or when the drain deadline passes. Closing is a shutdown
/// of both legs, so the relay ends on its own and still reports its bytes. Returns its outcome,
/// and why the agent stopped it, if it did.
async fn watch<F: Future>(
    relay: F,
    client: &TcpStream,
    upstream: &Upstream,
    timeout: Duration,
    drained: &mut Drained,
) -> (F::Output, Option<Stop>) {
    let poll = (timeout / 4).clamp(Duration::from_millis(25), Duration::from_secs(5));
    tokio::pin!(relay);
    let progress = || crate::sys::tcp_progress(client.as_fd()).ok();
    let mut last = progress();
    let mut since = tokio::time::Instant::now();
    let mut stopped = None;
    let stop = |why| {
        let _ = net::shutdown_both(client);
        let _ = net::shutdown_both(upstream);
        Some(why)
    };
    loop {
        tokio::select! {
            out = &mut relay => return (out, stopped),
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
}
