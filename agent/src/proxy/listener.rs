//! One listener's accept loop: each connection admitted under the limits
//! ([`super::state::ListenerState::admit`]) and handed to its own task
//! ([`super::connection::serve`]), or refused cleanly; when told to stop, its connections
//! drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::connection;
use super::parking::{Driver, Parking, Woken};
use super::relay::{self, Drained, Signal};
use super::sources::SourceTable;
use super::state::ListenerState;
use crate::outcome::Facts;

/// Starts serving one accepted connection, or refuses it (cleanly, counted, logged) when a
/// connection limit is reached. Never waits: the accept loop must not block.
fn admit(
    state: &Arc<ListenerState>,
    connections: &mut JoinSet<()>,
    sock: TcpStream,
    peer: std::net::SocketAddr,
    drained: &Drained,
    parking: Option<&Arc<Parking>>,
    sources: &Arc<SourceTable>,
) {
    match state.admit(sources, peer) {
        Ok(admission) => {
            let serving = connection::serve(
                state.clone(),
                admission,
                sock,
                peer,
                drained.clone(),
                parking.cloned(),
            );
            connections.spawn(serving);
        }
        Err(refused) => {
            // A FIN, and whatever the client already sent read away, rather than a reset;
            // bounded in time by the linger, and in number: past that, closed at once.
            match state.limits.lingering.clone().try_acquire_owned() {
                Ok(place) => {
                    let state = state.clone();
                    connections.spawn(async move {
                        let ended = Err(refused.lingering(sock));
                        let place = connection::Places::Refused(place);
                        connection::conclude(&state, peer, Facts::default(), ended, place).await;
                    });
                }
                Err(_) => {
                    drop(sock);
                    connection::record(state, peer, Facts::default(), Err(refused));
                }
            }
        }
    }
}

/// Accepts on one listener until told to stop, each connection in its own task with the
/// settings current when it arrived (a reload may change them), idle connections parked
/// without one; then the listener closes, its connections get until the deadline to finish,
/// and those still open are told to end (each reports the reason `drain deadline`). Returns
/// when every connection has ended. When `stop` asks the connections to move to a new agent,
/// that is passed on to them (and called off when it is).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    states: watch::Receiver<Arc<ListenerState>>,
    mut stop: Drained,
    parking: Option<(Arc<Parking>, Driver, mpsc::UnboundedReceiver<Woken>)>,
    sources: Arc<SourceTable>,
) {
    let current = || states.borrow().clone();
    let mut state = current();
    let mut connections = JoinSet::new();
    // The deadline once the drain deadline has passed, and whether to move: every connection
    // task watches it.
    let (drain_tx, drained) = watch::channel(Signal::default());
    // Dropped with this loop, which stops its driver.
    let mut driver = JoinSet::new();
    let (parking, mut woken) = match parking {
        Some((parking, parked, woken)) => {
            driver.spawn(parked.run(drained.clone()));
            (Some(parking), Some(woken))
        }
        None => {
            tracing::warn!(listener = %state.config.name,
                "no epoll set for idle connections: each keeps a task");
            (None, None)
        }
    };
    let deadline = {
        let stopped = relay::drain_passed(&mut stop);
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                deadline = &mut stopped => break deadline,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    log_panic(&state, done);
                }
                Some(w) = next_woken(&mut woken) => {
                    take_woken(parking.as_ref(), &mut connections, w, &drained);
                }
                accepted = listener.accept() => match accepted {
                    Ok((sock, peer)) => {
                        state = current();
                        // A relay must not hold back small writes (Nagle): request/response traffic
                        // would wait for the peer's delayed ACK on every message.
                        if let Err(e) = sock.set_nodelay(true) {
                            tracing::debug!(listener = %state.config.name, %peer, error = %e, "TCP_NODELAY");
                        }
                        admit(&state, &mut connections, sock, peer, &drained, parking.as_ref(), &sources);
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = %state.config.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    };
    drop(listener);
    pass_move_on(&stop, &drain_tx);
    let held = || parking.as_ref().map_or(0, |p| p.held());
    if !connections.is_empty() || held() > 0 {
        tracing::info!(listener = %state.config.name, connections = connections.len() + held(),
            deadline_ms = deadline.as_millis(), "listener closed; draining its connections");
    }
    let parking = parking.as_ref();
    let mut drain = Draining {
        connections: &mut connections,
        woken: &mut woken,
        parking,
        drained: &drained,
        state: &state,
        stop: &mut stop,
        drain_tx: &drain_tx,
    };
    if tokio::time::timeout(deadline, drain.until_ended())
        .await
        .is_err()
    {
        drain_tx.send_modify(|s| s.deadline = Some(deadline));
        drain.until_ended().await;
    }
}

/// A closed listener's connections, until every one has ended.
struct Draining<'a> {
    connections: &'a mut JoinSet<()>,
    woken: &'a mut Option<mpsc::UnboundedReceiver<Woken>>,
    parking: Option<&'a Arc<Parking>>,
    drained: &'a Drained,
    state: &'a ListenerState,
    /// What the proxy says while the listener drains (a move to a new agent, called off).
    stop: &'a mut Drained,
    drain_tx: &'a watch::Sender<Signal>,
}

/// Tells the connections whether to move to a new agent, as the proxy says.
fn pass_move_on(stop: &Drained, drain_tx: &watch::Sender<Signal>) {
    let move_out = stop.borrow().move_out;
    drain_tx.send_if_modified(|s| std::mem::replace(&mut s.move_out, move_out) != move_out);
}

impl Draining<'_> {
    /// Returns when every connection has ended, parked ones included (their driver hands them
    /// over when they end, and all of them at the drain deadline).
    async fn until_ended(&mut self) {
        let held = |p: Option<&Arc<Parking>>| p.map_or(0, |p| p.held());
        while !self.connections.is_empty() || held(self.parking) > 0 {
            tokio::select! {
                Some(done) = self.connections.join_next(), if !self.connections.is_empty() => {
                    log_panic(self.state, done);
                }
                Some(w) = next_woken(self.woken) => {
                    take_woken(self.parking, self.connections, w, self.drained);
                }
                Ok(()) = self.stop.changed() => pass_move_on(self.stop, self.drain_tx),
                // The woken connections' channel closed (it cannot while this loop holds
                // the parking): nothing more can come back.
                else => break,
            }
        }
    }
}

/// Logs a connection task that panicked.
fn log_panic(state: &ListenerState, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(listener = %state.config.name, error = %e, "connection task panicked");
    }
}

/// The next parked connection its driver woke; never, when there is no parking.
async fn next_woken(woken: &mut Option<mpsc::UnboundedReceiver<Woken>>) -> Option<Woken> {
    match woken {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Gives a woken connection a task of its own, which relays it until it ends or parks again.
fn take_woken(
    parking: Option<&Arc<Parking>>,
    connections: &mut JoinSet<()>,
    woken: Woken,
    drained: &Drained,
) {
    if let Some(parking) = parking {
        parking.taken();
    }
    connections.spawn(connection::resume(woken, drained.clone(), parking.cloned()));
}
