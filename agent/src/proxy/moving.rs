//! Connections moving between agents at a takeover ([`crate::takeover`]). The old agent turns
//! a parked spliced connection (kTLS + splice, splice) into what travels: its record and its
//! two legs ([`outgoing`]); the new agent turns that back into a parked connection of its
//! listener ([`incoming`]), which its accept loop takes up as if it had just been woken.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use super::parking::Parked;
use super::relay::{IdleConn, MovingLegs, ktls::RekeyPolicy};
use super::state::{Admission, Admitted, ListenerState};
use crate::outcome::{DataPath, Facts, HandshakeOutcome, Reason, Session};
use crate::takeover::{ConnectionRecord, MovingConnection};

/// Where connections that can move go during a takeover, from the listeners' parkings.
#[derive(Debug, Clone)]
pub struct MoveTo(pub(crate) Sender<Box<Parked>>);

/// The takeover's side of [`MoveTo`]: each connection as it comes to rest, ready to travel.
/// Dropped, it makes every connection still to come park here instead (a move that stopped).
pub struct MovingConnections(Receiver<Box<Parked>>);

/// A channel for the connections of one takeover.
pub fn moving_channel() -> (MoveTo, MovingConnections) {
    let (to, from) = std::sync::mpsc::channel();
    (MoveTo(to), MovingConnections(from))
}

impl MovingConnections {
    /// The next connection within `wait`: `Ok(None)` for one whose state could not be read
    /// (closed: count it lost).
    pub fn recv_timeout(
        &self,
        wait: Duration,
    ) -> Result<Option<MovingConnection>, RecvTimeoutError> {
        self.0
            .recv_timeout(wait)
            .map(|parked| outgoing(*parked).ok())
    }

    /// The next connection already there, if any (as [`MovingConnections::recv_timeout`]).
    pub fn try_recv(&self) -> Option<Option<MovingConnection>> {
        self.0.try_recv().ok().map(|parked| outgoing(*parked).ok())
    }
}

/// Relays that may move (running with a move signal) and have neither ended, come to rest for
/// a move, nor given one up, over the process.
static MOVES_PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Relays that could still come to rest for a move (running, not given up): once a takeover
/// has asked them, the moves are over when this is 0 and nothing came for a moment.
pub fn moves_pending() -> usize {
    MOVES_PENDING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one relay that may move until dropped.
pub(crate) struct MovePending(());

impl MovePending {
    pub(crate) fn new() -> Self {
        MOVES_PENDING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(())
    }
}

impl Drop for MovePending {
    fn drop(&mut self) {
        MOVES_PENDING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A parked connection as it travels to a new agent, or itself back when it cannot move (a
/// sockmap connection, or a kTLS leg whose state could not be read). Its places under this
/// agent's limits are given back; it is not recorded here: the new agent records its end.
pub(crate) fn outgoing(parked: Parked) -> Result<MovingConnection, Box<Parked>> {
    let Parked { conn, idle } = parked;
    if let (Some(keys), Some(bpf)) = (idle.sockmap_keys(), conn.state.telemetry.bpf()) {
        bpf.sockmap_moved_out(keys);
    }
    let legs = match idle.into_moving() {
        Ok(legs) => legs,
        Err(idle) => return Err(Box::new(Parked { conn, idle })),
    };
    let Admitted {
        state, peer, facts, ..
    } = *conn;
    let data_path = facts.data_path.unwrap_or(DataPath::Splice);
    let record = ConnectionRecord {
        listener: state.config.name.clone(),
        peer,
        data_path: data_path.as_str().to_owned(),
        path_reason: facts.path_reason.to_string(),
        session: facts.session_text(),
        client_identity: facts.client_identity.clone(),
        client_handshake: completed(facts.client_handshake.as_ref()),
        upstream_handshake: completed(facts.upstream_handshake.as_ref()),
        groups: (
            facts.client_handshake.map_or(0, |h| h.group),
            facts.upstream_handshake.map_or(0, |h| h.group),
        ),
        bytes_up: facts.bytes_up,
        bytes_down: facts.bytes_down,
        upstream_unix: legs.upstream_unix,
        idle_ms: u64::try_from(legs.idle_for.as_millis()).unwrap_or(u64::MAX),
        client_leg: legs.client_leg,
        upstream_leg: legs.upstream_leg,
        sockmap: legs.sockmap,
    };
    Ok(MovingConnection {
        record,
        client: legs.client,
        upstream: legs.upstream,
    })
}

/// A completed handshake as it travels (version, suite); the agent counts handshakes when a
/// connection ends, so a moved one's are counted by the new agent.
fn completed(h: Option<&HandshakeOutcome>) -> Option<(u16, u16)> {
    h.filter(|h| h.outcome == Reason::Ok)
        .map(|h| (h.version, h.suite))
}

/// The data path a moved connection's record names: only the spliced paths move.
pub(crate) fn moved_path(name: &str) -> Option<DataPath> {
    match name {
        "ktls" => Some(DataPath::Ktls),
        "splice" => Some(DataPath::Splice),
        "sockmap" => Some(DataPath::Sockmap),
        _ => None,
    }
}

/// A connection handed over by the agent before this one, as a parked connection of the
/// listener `state` under the places `admission` holds; or why it cannot be adopted (its
/// legs close).
pub(crate) fn incoming(
    moving: MovingConnection,
    state: Arc<ListenerState>,
    admission: Admission,
) -> Result<Box<Parked>, String> {
    let MovingConnection {
        record,
        client,
        upstream,
    } = moving;
    let path = moved_path(&record.data_path)
        .ok_or_else(|| format!("data path {:?} does not move", record.data_path))?;
    let rekey = RekeyPolicy {
        kernel: state.caps.rekey(),
        after_records: state.config.rekey_after_records,
        key_updates_per_second: state.limits.key_updates_per_second,
    };
    let legs = MovingLegs {
        client,
        upstream,
        upstream_unix: record.upstream_unix,
        client_leg: record.client_leg.clone(),
        upstream_leg: record.upstream_leg.clone(),
        sockmap: record.sockmap.clone(),
        idle_for: std::time::Duration::from_millis(record.idle_ms),
    };
    let bpf = state.telemetry.bpf();
    let idle = IdleConn::moved(legs, state.config.idle_timeout(), &rekey, bpf)
        .map_err(|e| format!("taking its legs: {e}"))?;
    let handshake = |h: Option<(u16, u16)>, group: u16| {
        h.map(|(version, suite)| HandshakeOutcome {
            outcome: Reason::Ok,
            version,
            suite,
            group,
        })
    };
    let mut facts = Facts {
        session: Session::Moved(record.session.into()),
        client_handshake: handshake(record.client_handshake, record.groups.0),
        upstream_handshake: handshake(record.upstream_handshake, record.groups.1),
        client_identity: record.client_identity,
        bytes_up: record.bytes_up,
        bytes_down: record.bytes_down,
        accepted_ms: crate::outcome::agent_millis(),
        ..Facts::default()
    };
    facts.active = Some(state.telemetry.active_connection(state.index, path));
    facts.take_path(
        path,
        format!(
            "{} (moved from the agent before this one)",
            record.path_reason
        ),
    );
    let conn = Box::new(Admitted {
        state,
        admission,
        peer: record.peer,
        facts,
    });
    Ok(Box::new(Parked { conn, idle }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kernel_paths_move() {
        for path in [
            DataPath::Ktls,
            DataPath::Splice,
            DataPath::Sockmap,
            DataPath::Userspace,
        ] {
            let moves = path != DataPath::Userspace;
            assert_eq!(moved_path(path.as_str()), moves.then_some(path), "{path}");
        }
        assert_eq!(moved_path("anything"), None);
    }
}
