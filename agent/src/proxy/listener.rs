//! One listener's accept loop: each connection admitted under the limits
//! ([`super::state::ListenerState::admit`]) and handed to its own task
//! ([`super::connection::serve`]), or refused cleanly; when told to stop, its connections
//! drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::connection;
use super::relay::{self, Drained};
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
) {
    match state.admit() {
        Ok(admission) => {
            let state = state.clone();
            let drained = drained.clone();
            connections.spawn(async move {
                connection::serve(&state, admission, sock, peer, drained).await;
            });
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
/// settings current when it arrived (a reload may change them); then the listener closes, its
/// connections get until the deadline to finish, and those still open are told to end (each
/// reports the reason `drain deadline`). Returns when every connection has ended.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    states: watch::Receiver<Arc<ListenerState>>,
    mut stop: Drained,
) {
    let current = || states.borrow().clone();
    let mut state = current();
    let mut connections = JoinSet::new();
    // Some(deadline) once the drain deadline has passed: every connection task watches it.
    let (drain_tx, drained) = watch::channel(None);
    let stopped = relay::drain_passed(&mut stop);
    tokio::pin!(stopped);
    let deadline = loop {
        tokio::select! {
            biased;
            deadline = &mut stopped => break deadline,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(listener = %state.config.name, error = %e, "connection task panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    state = current();
                    // A relay must not hold back small writes (Nagle): request/response traffic
                    // would wait for the peer's delayed ACK on every message.
                    if let Err(e) = sock.set_nodelay(true) {
                        tracing::debug!(listener = %state.config.name, %peer, error = %e, "TCP_NODELAY");
                    }
                    admit(&state, &mut connections, sock, peer, &drained);
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %state.config.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    };
    drop(listener);
    if !connections.is_empty() {
        tracing::info!(listener = %state.config.name, connections = connections.len(),
            deadline_ms = deadline.as_millis(), "listener closed; draining its connections");
    }
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(deadline, drain).await.is_err() {
        let _ = drain_tx.send(Some(deadline));
        while connections.join_next().await.is_some() {}
    }
}
