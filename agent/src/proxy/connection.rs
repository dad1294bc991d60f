//! One connection's life: its mode sets it up ([`super::tls`], [`super::passthrough`]) into an
//! [`Established`](super::relay::Established) value, its data path moves the bytes
//! ([`super::relay`]), and it ends as `Ok` or a typed [`Failure`]. [`conclude`] is the one place
//! where that end is turned into the report, the counters and the one log line ([`record`]),
//! and where the lingering close is done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::parking::{Parked, Parking, Woken};
use super::relay::{self, Drained, IdleConn, Relayed, Wake};
use super::state::{Admission, Admitted, ListenerState};
use super::{passthrough, tls};
use crate::config::Mode;
use crate::outcome::{ConnectionReport, DataPath, Facts, Failure};

/// Serves one admitted connection to its end (or to the drain deadline), then concludes it; an
/// idle connection is parked in `parking` meanwhile, to be taken up again by [`resume`].
pub(crate) async fn serve(
    state: Arc<ListenerState>,
    admission: Admission,
    sock: TcpStream,
    peer: SocketAddr,
    mut drained: Drained,
    parking: Option<Arc<Parking>>,
) {
    // On the heap: the task would otherwise hold it twice (here and in `settle`), and a parked
    // connection keeps it as it is.
    let mut conn = Box::new(Admitted {
        state,
        admission,
        peer,
        facts: Facts {
            accepted_ms: crate::outcome::agent_millis(),
            ..Facts::default()
        },
    });
    let park_after = parking.as_ref().map(|_| relay::PARK_AFTER);
    let facts = &mut conn.facts;
    let relayed = handle(&conn.state, sock, peer, facts, &mut drained, park_after).await;
    settle(conn, relayed, drained, parking).await;
}

/// Relays a parked connection taken up again, then parks or concludes it.
pub(crate) async fn resume(woken: Woken, mut drained: Drained, parking: Option<Arc<Parking>>) {
    let Parked { mut conn, idle } = *woken.parked;
    let park = parking.is_some();
    let relayed = Box::pin(resume_relay(
        &mut conn,
        idle,
        woken.wake,
        &mut drained,
        park,
    ))
    .await;
    settle(conn, relayed, drained, parking).await;
}

/// Runs a parked connection's relay again; with `park`, it may come back idle again.
async fn resume_relay(
    conn: &mut Admitted,
    idle: IdleConn,
    wake: Wake,
    drained: &mut Drained,
    park: bool,
) -> Result<Relayed, Failure> {
    let park_after = park.then_some(relay::PARK_AFTER);
    let (bpf, pipes) = (conn.state.telemetry.bpf(), &conn.state.limits.pipes);
    relay::resume(idle, bpf, pipes, wake, &mut conn.facts, drained, park_after).await
}

/// Parks a connection its relay left idle, or concludes one whose relay ended. One that cannot
/// be parked (no epoll set, the drain deadline passed) is relayed on by this task.
async fn settle(
    mut conn: Box<Admitted>,
    mut relayed: Result<Relayed, Failure>,
    mut drained: Drained,
    parking: Option<Arc<Parking>>,
) {
    let ended = loop {
        match relayed {
            Ok(Relayed::Done) => break Ok(()),
            Err(failure) => break Err(failure),
            Ok(Relayed::Idle(idle)) => {
                let parked = Box::new(Parked { conn, idle });
                let back = match &parking {
                    Some(parking) => match parking.park(parked) {
                        Ok(()) => return,
                        Err(back) => back,
                    },
                    None => parked,
                };
                let Parked { conn: back, idle } = *back;
                conn = back;
                let resumed = resume_relay(&mut conn, idle, Wake::Ready, &mut drained, false);
                relayed = Box::pin(resumed).await;
            }
        }
    };
    let Admitted {
        state,
        admission,
        peer,
        facts,
    } = *conn;
    conclude(&state, peer, facts, ended, Places::Admitted(admission)).await;
}

/// Sets the connection up by its listener's mode, then moves its bytes until it ends. At the
/// drain deadline a connection still being set up is dropped; one relaying is shut down, so
/// its data path still reports what it moved (and is dropped if it does not end a moment
/// later, so a drain always ends).
async fn handle(
    state: &ListenerState,
    sock: TcpStream,
    peer: SocketAddr,
    facts: &mut Facts,
    drained: &mut Drained,
    park_after: Option<std::time::Duration>,
) -> Result<Relayed, Failure> {
    // On the heap, and freed once the connection is set up: handshakes hold far more than a
    // relay does, and an established connection should not carry their size. Its result is
    // boxed too, so it takes no room in this future beside the relay's.
    let setup = Box::pin(async {
        match state.config.mode {
            Mode::Terminate | Mode::Reencrypt | Mode::Originate => {
                tls::establish(state, sock, peer, facts).await
            }
            Mode::Passthrough => passthrough::establish(state, sock, peer, facts).await,
        }
        .map(Box::new)
    });
    let established = tokio::select! {
        established = setup => established?,
        deadline = relay::drain_passed(drained) => return Err(relay::drain_deadline(deadline)),
    };
    tracing::debug!(listener = %state.config.name, %peer,
        data_path = %established.plan.path(), reason = %facts.path_reason,
        session = %facts.session_text(), "data path chosen");
    facts.active = Some(
        state
            .telemetry
            .active_connection(state.index, established.plan.path()),
    );
    let pipes = &state.limits.pipes;
    let bpf = state.telemetry.bpf();
    relay::run(established, bpf, pipes, facts, drained, park_after).await
}

/// The places a connection holds until it is concluded.
pub(crate) enum Places {
    /// Admitted: its places under the connection limits. It is recorded once they are free,
    /// after its lingering close, so a report means its places can be taken again.
    Admitted(Admission),
    /// Refused: a place among the refused connections closed gently. It held no connection
    /// place, so it is recorded at once, before the lingering close.
    Refused(OwnedSemaphorePermit),
}

/// Ends a connection: it is recorded, and the client socket a failure left open is closed
/// gently (a FIN, then what the client still sends read away for a moment); in the order its
/// `places` say.
pub(crate) async fn conclude(
    state: &ListenerState,
    peer: SocketAddr,
    facts: Facts,
    mut ended: Result<(), Failure>,
    places: Places,
) {
    let linger = match &mut ended {
        Err(failure) => failure.linger.take(),
        Ok(()) => None,
    };
    match places {
        Places::Admitted(admission) => {
            if let Some(sock) = linger {
                linger_close(sock).await;
            }
            drop(admission);
            record(state, peer, facts, ended);
        }
        Places::Refused(place) => {
            record(state, peer, facts, ended);
            if let Some(sock) = linger {
                linger_close(sock).await;
            }
            drop(place);
        }
    }
}

/// The one record point: a connection's end as its report, its counters and its log line.
pub(crate) fn record(
    state: &ListenerState,
    peer: SocketAddr,
    facts: Facts,
    ended: Result<(), Failure>,
) {
    let report = ConnectionReport::new(&state.config.name, peer, facts, ended);
    if !super::state::is_limit_refusal(report.outcome) {
        log(&report);
    } else if let Some(unlogged) = state.limits.refusals.log_now(state.index, report.outcome) {
        let error = report.error.as_deref().unwrap_or_default();
        let outcome = report.outcome.as_str();
        tracing::warn!(listener = %report.listener, peer = %report.peer, data_path = "none",
            outcome = %outcome, reason = %outcome, error = %error,
            unlogged_since_last = unlogged,
            "connection refused by a limit (one line per limit and listener every 10 s; \
             tlsplice_connections_total counts each)");
    }
    state.telemetry.record(state.index, &report);
    if let Some(tx) = &state.reports {
        let _ = tx.send(report);
    }
}

/// The one log line of a connection: `reason` says why its data path, or, when it got none,
/// what ended it (as `outcome` does for every connection).
fn log(r: &ConnectionReport) {
    let path = r.data_path.map_or("none", DataPath::as_str);
    let reason = match r.data_path {
        Some(_) => r.path_reason.as_str(),
        None => r.outcome.as_str(),
    };
    let outcome = r.outcome.as_str();
    let client = r.client_identity.as_deref().unwrap_or("-");
    match &r.error {
        None => tracing::info!(
            listener = %r.listener, peer = %r.peer, data_path = %path, outcome = %outcome,
            reason = %reason, session = %r.session, client_identity = %client,
            bytes_up = r.bytes_up, bytes_down = r.bytes_down, key_updates = r.key_updates,
            tickets = r.tickets, "connection closed"
        ),
        Some(e) => tracing::warn!(
            listener = %r.listener, peer = %r.peer, data_path = %path, outcome = %outcome,
            reason = %reason, session = %r.session, client_identity = %client,
            bytes_up = r.bytes_up, bytes_down = r.bytes_down, key_updates = r.key_updates,
            tickets = r.tickets, error = %e, "connection failed"
        ),
    }
}

/// Closes without a reset: a FIN, then what the peer still sends discarded (bounded in bytes
/// and time). Closing a socket with unread input would make the kernel answer with RST, and the
/// peer might lose the alert or close_notify sent just before.
async fn linger_close(mut sock: TcpStream) {
    let _ = sock.shutdown().await;
    // On the heap: inline, it would sit in every connection's task for its whole life.
    let mut sink = vec![0u8; 4096];
    let drain = async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match sock.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
