//! Live upgrade: a new agent takes the listening sockets over from the running one, so no
//! connection attempt is refused while the binary changes.
//!
//! The running agent listens on a unix socket (`--takeover-socket`). A new agent started with
//! `--takeover PATH` connects before it binds anything and says which record version it speaks;
//! the old one checks who it is (`SO_PEERCRED`: the same user, or root) and answers with every
//! listening socket it accepts on (the proxy's listeners and the admin server), each a
//! descriptor passed with `SCM_RIGHTS` beside a record of its name and address. The new agent
//! accepts on those same sockets (the kernel's accept queue is shared, so both processes
//! accept during the hand-over: no gap), and once it serves, says so; only then does the old
//! agent close its copies and drain its established connections as on SIGTERM. A new agent
//! that fails anywhere before that (bad configuration, failed start, another record version)
//! never says it serves, and the old agent goes on with everything.
//!
//! Then established connections move. The old agent asks every connection on a spliced data
//! path (kTLS + splice, plain splice) of a listener the new agent adopted to stop where it
//! holds nothing but its sockets (no bytes in a pipe, no write pending, no control record half
//! handled); parked ones already are. Each goes over in batches as its two descriptors beside
//! a [`ConnectionRecord`] (its listener, client, data path and why, counters, and for each kTLS
//! leg its version, cipher, record counts and TLS 1.3 key schedule, for the KeyUpdates to
//! come; the kernel keeps the keys in use with the socket), and the new agent answers how
//! many it adopted before the old one closes its copies. Records are zeroized once sent or
//! read. What cannot move stays and ends or drains in the old process: connections on the
//! user-space TLS path, those still in their handshake, those ending (a sockmap relay
//! forwarding what its verdict passed up), and any that did not come to rest within the move
//! window. A sockmap connection moves as its sockets and their cookies, whether or not the
//! kernel is redirecting its bytes (with the maps adopted). With eBPF on, the pin directory's lock travels with the listening sockets, and a
//! new agent built with the same eBPF object adopts the pinned maps
//! ([`crate::bpf::LoadedBpf::load_adopting`]). The last
//! record says how many moved, were lost and stayed.
//!
//! Records are length-delimited JSON (a 4-byte big-endian length, then the record), each with
//! the protocol version. This module is the only place that passes descriptors over a unix
//! socket.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The version of the records both sides exchange. A new agent speaking another version is
/// refused and the old one keeps serving.
pub const RECORD_VERSION: u32 = 2;

/// Connections in one record of moving connections: two descriptors each.
pub const MOVE_BATCH: usize = 100;

/// The name under which the admin server's listening socket travels.
pub const ADMIN_SOCKET: &str = "admin";

/// The most descriptors one record carries.
const MAX_DESCRIPTORS: usize = 253;

/// The largest record either side accepts.
const MAX_RECORD: usize = 1 << 20;

/// How long either side waits for the other's next record.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong in a takeover, on either side.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// A socket call failed.
    #[error("takeover socket {path}: {call}: {source}")]
    Io {
        /// The takeover socket's path.
        path: PathBuf,
        /// The call that failed.
        call: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The other side sent something this side does not accept.
    #[error("takeover socket {path}: {why}")]
    Protocol {
        /// The takeover socket's path.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// The old agent refused the takeover.
    #[error("takeover refused by the running agent: {0}")]
    Refused(String),
}

impl TakeoverError {
    /// Nothing listens on the takeover socket (no file, or nobody accepts): there is no agent
    /// to take over from, and a new one starts as on a fresh node.
    pub fn nobody_there(&self) -> bool {
        matches!(self, TakeoverError::Io { call: "connect", source, .. }
            if matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused))
    }
}

/// One record of the takeover protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Adjacently tagged, the tag written first: a record is decoded straight into its fields,
// never buffered whole (an internally tagged one would be, key schedules and all, in memory
// nothing zeroizes).
#[serde(tag = "record", content = "fields", rename_all = "snake_case")]
pub enum Record {
    /// New to old: the first record.
    Hello {
        /// The record version the new agent speaks.
        version: u32,
        /// The new agent's process id, for the old one's log.
        pid: u32,
    },
    /// Old to new: the listening sockets, one descriptor each, in this order; then, with
    /// `bpf`, the eBPF pin directory's lock.
    Listeners {
        /// The record version.
        version: u32,
        /// Each socket's name and address.
        sockets: Vec<SocketRecord>,
        /// The old agent's eBPF maps, for the new one to adopt.
        #[serde(default)]
        bpf: Option<BpfHandover>,
    },
    /// New to old: it accepts on these sockets now; the old agent may stop.
    Serving {
        /// The record version.
        version: u32,
        /// The names of the sockets it adopted.
        adopted: Vec<String>,
        /// It adopted the eBPF maps: the old agent leaves them (and its pins) in place.
        #[serde(default)]
        bpf_adopted: bool,
    },
    /// Old to new, after `serving`: established connections, two descriptors each (the client
    /// leg, then the upstream leg), in this order.
    Connections {
        /// The record version.
        version: u32,
        /// Each connection's state.
        connections: Vec<ConnectionRecord>,
    },
    /// New to old: of the last `connections`, how many it adopted; it closed the others, and
    /// says why.
    Adopted {
        /// The record version.
        version: u32,
        /// How many it adopted.
        adopted: u64,
        /// Why each of the others was not.
        refused: Vec<String>,
    },
    /// Old to new: no more connections come.
    Moved {
        /// The record version.
        version: u32,
        /// What the moves came to.
        summary: MoveSummary,
    },
    /// Either side: the takeover does not happen, and why. The old agent keeps serving.
    Refused {
        /// The record version.
        version: u32,
        /// Why.
        reason: String,
    },
}

/// The old agent's eBPF maps as a new agent may adopt them: where they are pinned, and which
/// object made them (adopted only by an agent built with the same one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfHandover {
    /// The pin directory.
    pub pin_dir: PathBuf,
    /// The object's fingerprint ([`crate::bpf::object_id`]).
    pub object: String,
}

/// What the old agent hands over first: its listening sockets and, with eBPF on, its maps
/// (the pin directory's lock travels with them).
#[derive(Debug, Default)]
pub struct Offer {
    /// Each listening socket.
    pub sockets: Vec<(SocketRecord, OwnedFd)>,
    /// The eBPF maps and the pin directory's lock.
    pub bpf: Option<(BpfHandover, OwnedFd)>,
}

/// A listening socket as it travels: its name and the address it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRecord {
    /// A proxy listener's name, or [`ADMIN_SOCKET`].
    pub name: String,
    /// The address it is bound to.
    pub addr: SocketAddr,
}

/// An established connection as it travels to a new agent (beside its two descriptors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Its listener's name.
    pub listener: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// Its data path (`ktls` or `splice`).
    pub data_path: String,
    /// Why it has that data path.
    pub path_reason: String,
    /// What was negotiated, as its report says it.
    pub session: String,
    /// The verified client certificate's names (mTLS listeners).
    pub client_identity: Option<String>,
    /// The client leg's completed handshake (version, suite: wire values), counted when the
    /// connection ends in the new agent.
    #[serde(default)]
    pub client_handshake: Option<(u16, u16)>,
    /// The upstream leg's completed handshake (version, suite).
    #[serde(default)]
    pub upstream_handshake: Option<(u16, u16)>,
    /// The key exchange groups of the client and upstream legs (IANA values; 0: none, or an
    /// agent that did not send them).
    #[serde(default)]
    pub groups: (u16, u16),
    /// Plaintext bytes moved so far, client to upstream.
    pub bytes_up: u64,
    /// Plaintext bytes moved so far, upstream to client.
    pub bytes_down: u64,
    /// The upstream leg is a unix socket, not TCP.
    pub upstream_unix: bool,
    /// How long it had moved nothing either way (its idle timeout counts on from there).
    pub idle_ms: u64,
    /// The client leg's kTLS state (terminate, reencrypt).
    pub client_leg: Option<LegRecord>,
    /// The upstream leg's kTLS state (reencrypt, originate).
    pub upstream_leg: Option<LegRecord>,
    /// A sockmap connection's entries in the shared (adopted) maps.
    #[serde(default)]
    pub sockmap: Option<SockmapRecord>,
}

/// A parked sockmap connection as it travels: its legs stay in the sock hash the new agent
/// adopted, keyed by their socket cookies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockmapRecord {
    /// The sockets' cookies (client leg, upstream leg).
    pub cookies: [u64; 2],
    /// Where each leg's send sequence stood when it entered the sock hash.
    pub send_starts: [u64; 2],
}

/// A leg whose record layer is in the kernel, as it travels: what the agent keeps beside the
/// kernel's state (the keys in use travel with the socket, inside the kernel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegRecord {
    /// The TLS version.
    pub version: crate::ktls::TlsVersion,
    /// The AEAD cipher.
    pub cipher: crate::ktls::Cipher,
    /// The agent is the TLS client on this leg.
    pub agent_is_client: bool,
    /// Records the suite allows under one key.
    pub confidentiality_limit: u64,
    /// Records sent under the current key (the agent's estimate).
    pub tx_records: u64,
    /// KeyUpdates followed and sent.
    pub key_updates: u32,
    /// TLS 1.2 renegotiations refused.
    pub renegotiations_refused: u8,
    /// Warning alerts the session outlived.
    pub warning_alerts: u8,
    /// Session tickets stored.
    pub tickets: u64,
    /// Its TLS 1.3 key schedule (the current traffic secret each way), for the KeyUpdates to
    /// come; the only secret that travels, and only over the takeover socket (the record's
    /// bytes are zeroized on both sides).
    pub schedule: Option<crate::handoff::Schedule>,
}

/// What the moves of one takeover came to, as the old agent counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveSummary {
    /// Connections the new agent adopted.
    pub moved: u64,
    /// Connections sent that the new agent could not adopt, or that could not be sent: closed.
    pub lost: u64,
    /// Connections the old agent still holds once the moves end: they end or drain there.
    pub staying: u64,
}

/// A connection on its way to a new agent: its record and its two legs.
#[derive(Debug)]
pub struct MovingConnection {
    /// Its state.
    pub record: ConnectionRecord,
    /// The client leg.
    pub client: OwnedFd,
    /// The upstream leg.
    pub upstream: OwnedFd,
}

/// Whether the old agent accepts a peer: the same user as itself, or root.
pub fn peer_allowed(own_uid: u32, peer_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

/// Whether the old agent hands its sockets to the sender of `hello`: its process id, or why not.
pub fn answer_hello(hello: &Record) -> Result<u32, String> {
    match hello {
        Record::Hello { version, pid } if *version == RECORD_VERSION => Ok(*pid),
        Record::Hello { version, .. } => Err(format!(
            "record version {version}, this agent speaks {RECORD_VERSION}"
        )),
        other => Err(format!("expected a hello, got {}", other.kind())),
    }
}

impl Record {
    fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Listeners { .. } => "listeners",
            Self::Serving { .. } => "serving",
            Self::Connections { .. } => "connections",
            Self::Adopted { .. } => "adopted",
            Self::Moved { .. } => "moved",
            Self::Refused { .. } => "refused",
        }
    }
}

/// Listening sockets a new agent took over, by name: each used in place of a bind of the same
/// address.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: BTreeMap<String, (SocketAddr, OwnedFd)>,
    adopted: Vec<String>,
    bpf: Option<(BpfHandover, OwnedFd)>,
}

impl Inherited {
    /// The old agent's eBPF maps and its pin directory's lock, if it handed them over.
    pub fn take_bpf(&mut self) -> Option<(BpfHandover, OwnedFd)> {
        self.bpf.take()
    }

    /// The socket named `name` if it is bound to `addr` (a listener whose address changed
    /// binds anew, and the old socket closes with the old agent).
    pub fn take(&mut self, name: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let (bound, _) = self.sockets.get(name)?;
        if !same_address(*bound, addr) {
            return None;
        }
        let (_, fd) = self.sockets.remove(name)?;
        self.adopted.push(name.to_owned());
        Some(std::net::TcpListener::from(fd))
    }

    /// The names of the sockets taken so far.
    pub fn adopted(&self) -> &[String] {
        &self.adopted
    }

    /// Closes the sockets nothing took (a listener the configuration no longer has, or whose
    /// address changed): once the old agent stops they refuse connections instead of
    /// queueing them for nobody.
    pub fn close_rest(&mut self) {
        for (name, (addr, _)) in std::mem::take(&mut self.sockets) {
            tracing::info!(socket = %name, %addr,
                "takeover: a socket this configuration does not serve is closed");
        }
    }

    /// How many sockets came over.
    pub fn offered(&self) -> usize {
        self.adopted.len() + self.sockets.len()
    }
}

/// Whether a socket bound to `bound` serves a configuration that asks for `wanted` (port 0 in
/// the configuration takes whatever port the socket has).
fn same_address(bound: SocketAddr, wanted: SocketAddr) -> bool {
    bound.ip() == wanted.ip() && (wanted.port() == 0 || bound.port() == wanted.port())
}

/// The new agent's side: connected to the old agent, holding the sockets it handed over until
/// this agent serves.
pub struct Taker {
    stream: UnixStream,
    path: PathBuf,
}

impl Taker {
    /// Connects to the running agent at `path` and receives its listening sockets.
    pub fn connect(path: &Path, version: u32) -> Result<(Self, Inherited), TakeoverError> {
        let io = |call| {
            let path = path.to_owned();
            move |source| TakeoverError::Io { path, call, source }
        };
        let stream = UnixStream::connect(path).map_err(io("connect"))?;
        stream
            .set_read_timeout(Some(EXCHANGE_TIMEOUT))
            .map_err(io("SO_RCVTIMEO"))?;
        let mut taker = Self {
            stream,
            path: path.to_owned(),
        };
        taker.send(&Record::Hello {
            version,
            pid: std::process::id(),
        })?;
        let (record, fds) = receive(&mut taker.stream, &taker.path)?;
        match record {
            Record::Listeners { sockets, bpf, .. }
                if sockets.len() + usize::from(bpf.is_some()) == fds.len() =>
            {
                let mut fds = fds.into_iter();
                let sockets = sockets
                    .into_iter()
                    .zip(fds.by_ref())
                    .map(|(s, fd)| (s.name, (s.addr, fd)))
                    .collect();
                let bpf = bpf.zip(fds.next());
                Ok((
                    taker,
                    Inherited {
                        sockets,
                        adopted: Vec::new(),
                        bpf,
                    },
                ))
            }
            Record::Listeners { sockets, .. } => Err(TakeoverError::Protocol {
                path: path.to_owned(),
                why: format!(
                    "{} sockets named, {} descriptors passed",
                    sockets.len(),
                    fds.len()
                ),
            }),
            Record::Refused { reason, .. } => Err(TakeoverError::Refused(reason)),
            other => Err(TakeoverError::Protocol {
                path: path.to_owned(),
                why: format!("expected the listeners, got {}", other.kind()),
            }),
        }
    }

    /// Tells the old agent this one serves on `adopted`: it stops accepting, hands over the
    /// connections that can move ([`Taker::adopt_connections`]) and drains the rest.
    pub fn serving(
        &mut self,
        adopted: Vec<String>,
        bpf_adopted: bool,
    ) -> Result<(), TakeoverError> {
        self.send(&Record::Serving {
            version: RECORD_VERSION,
            adopted,
            bpf_adopted,
        })
    }

    /// Receives the old agent's established connections, batch by batch, each handed to
    /// `adopt` (which answers how many it adopted and why it closed the others), until the
    /// old agent says the moves are over; returns its summary.
    pub fn adopt_connections(
        mut self,
        adopt: &mut dyn FnMut(Vec<MovingConnection>) -> (u64, Vec<String>),
    ) -> Result<MoveSummary, TakeoverError> {
        loop {
            let (record, fds) = receive(&mut self.stream, &self.path)?;
            match record {
                Record::Connections { connections, .. } if fds.len() == 2 * connections.len() => {
                    let mut legs = fds.into_iter();
                    let batch = connections
                        .into_iter()
                        .filter_map(|record| {
                            Some(MovingConnection {
                                record,
                                client: legs.next()?,
                                upstream: legs.next()?,
                            })
                        })
                        .collect();
                    let (adopted, refused) = adopt(batch);
                    self.send(&Record::Adopted {
                        version: RECORD_VERSION,
                        adopted,
                        refused,
                    })?;
                }
                Record::Connections { connections, .. } => {
                    return Err(TakeoverError::Protocol {
                        path: self.path.clone(),
                        why: format!(
                            "{} connections, {} descriptors passed",
                            connections.len(),
                            fds.len()
                        ),
                    });
                }
                Record::Moved { summary, .. } => return Ok(summary),
                other => {
                    return Err(TakeoverError::Protocol {
                        path: self.path.clone(),
                        why: format!("expected connections, got {}", other.kind()),
                    });
                }
            }
        }
    }

    fn send(&mut self, record: &Record) -> Result<(), TakeoverError> {
        send(&mut self.stream, &self.path, record, &[])
    }
}

/// The old agent's side of the connections' moves, once the new agent serves.
pub struct Mover {
    stream: UnixStream,
    path: PathBuf,
    summary: MoveSummary,
}

impl std::fmt::Debug for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover")
            .field("path", &self.path)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl Mover {
    /// Hands `batch` (at most [`MOVE_BATCH`]) to the new agent and waits for its answer; this
    /// agent's copies of the legs close when this returns. On an error every connection of the
    /// batch counts as lost.
    pub fn send(&mut self, batch: Vec<MovingConnection>) -> Result<Vec<String>, TakeoverError> {
        let n = batch.len() as u64;
        let mut fds = Vec::with_capacity(2 * batch.len());
        let mut connections = Vec::with_capacity(batch.len());
        for m in &batch {
            fds.push(m.client.as_raw_fd());
            fds.push(m.upstream.as_raw_fd());
            connections.push(m.record.clone());
        }
        let record = Record::Connections {
            version: RECORD_VERSION,
            connections,
        };
        let answer = send(&mut self.stream, &self.path, &record, &fds)
            .and_then(|()| receive(&mut self.stream, &self.path));
        drop(batch);
        match answer {
            Ok((
                Record::Adopted {
                    adopted, refused, ..
                },
                _,
            )) => {
                let adopted = adopted.min(n);
                self.summary.moved += adopted;
                self.summary.lost += n - adopted;
                Ok(refused)
            }
            Ok((other, _)) => {
                self.summary.lost += n;
                Err(TakeoverError::Protocol {
                    path: self.path.clone(),
                    why: format!("expected adopted, got {}", other.kind()),
                })
            }
            Err(e) => {
                self.summary.lost += n;
                Err(e)
            }
        }
    }

    /// Counts connections lost before they could be sent.
    pub fn lost(&mut self, n: u64) {
        self.summary.lost += n;
    }

    /// Tells the new agent no more connections come; `staying` stay with this agent.
    pub fn finish(mut self, staying: u64) -> Result<MoveSummary, TakeoverError> {
        self.summary.staying = staying;
        let record = Record::Moved {
            version: RECORD_VERSION,
            summary: self.summary,
        };
        send(&mut self.stream, &self.path, &record, &[])?;
        Ok(self.summary)
    }
}

/// What the old agent's side of one takeover came to.
#[derive(Debug)]
pub enum Outcome {
    /// The new agent serves on these sockets: stop accepting, move what can move (with the
    /// [`Mover`]), drain the rest.
    TakenOver {
        /// The new agent's process id.
        pid: u32,
        /// The sockets it adopted.
        adopted: Vec<String>,
        /// It adopted the eBPF maps.
        bpf_adopted: bool,
        /// Where the connections go.
        mover: Mover,
    },
    /// No takeover; keep serving. Why.
    Refused(String),
}

/// The old agent's takeover socket.
pub struct Offering {
    listener: UnixListener,
    /// Where new agents connect.
    path: PathBuf,
    /// Where it is bound: `path`, or beside it until this agent, having taken over, moves it
    /// there ([`install`]).
    bound_at: PathBuf,
    /// The socket file's device and inode: removed on drop only while the path is still
    /// this agent's (a new agent that took over binds the same path).
    file: Option<(u64, u64)>,
}

impl Offering {
    /// Listens on `path`. A stale socket file from an agent that is gone is replaced; one
    /// another agent still listens on is an error. An agent that is taking over binds beside
    /// the path instead ([`beside`]) and moves its socket there once the old agent stops
    /// ([`install`]), so the old one stays reachable until then.
    pub fn bind(path: &Path, taking_over: bool) -> Result<Self, TakeoverError> {
        let io = |call| {
            let path = path.to_owned();
            move |source| TakeoverError::Io { path, call, source }
        };
        if taking_over {
            let bound_at = beside(path);
            match std::fs::remove_file(&bound_at) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io("remove a leftover socket")(e));
                }
                _ => {}
            }
            let listener = UnixListener::bind(&bound_at).map_err(io("bind"))?;
            return Ok(Self {
                listener,
                path: path.to_owned(),
                file: file_identity(&bound_at),
                bound_at,
            });
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt as _;
            if !meta.file_type().is_socket() {
                return Err(TakeoverError::Protocol {
                    path: path.to_owned(),
                    why: "exists and is not a socket".into(),
                });
            }
            // Replaced only when nobody listens there (connection refused), or when this
            // agent took over from the one that does.
            let stale = match UnixStream::connect(path) {
                Ok(_) => false,
                Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
            };
            if !stale {
                return Err(TakeoverError::Protocol {
                    path: path.to_owned(),
                    why: "another agent listens on it (or it cannot be reached)".into(),
                });
            }
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove the old socket")(e)),
            }
        }
        let listener = UnixListener::bind(path).map_err(io("bind"))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            bound_at: path.to_owned(),
            file: file_identity(path),
        })
    }

    /// Waits for the next new agent (blocking: run it on a thread of its own) and hands it
    /// the sockets `offer` gives at that moment.
    pub fn next(&mut self, offer: &dyn Fn() -> Option<Offer>) -> Result<Outcome, TakeoverError> {
        let io = |call| {
            let path = self.path.clone();
            move |source| TakeoverError::Io { path, call, source }
        };
        let (mut stream, _) = self.listener.accept().map_err(io("accept"))?;
        stream
            .set_read_timeout(Some(EXCHANGE_TIMEOUT))
            .map_err(io("SO_RCVTIMEO"))?;
        let peer = peer_uid(&stream).map_err(io("SO_PEERCRED"))?;
        let own = effective_uid();
        if !peer_allowed(own, peer) {
            let reason = format!("user {peer} may not take over an agent of user {own}");
            let _ = send(&mut stream, &self.path, &refused(&reason), &[]);
            return Ok(Outcome::Refused(reason));
        }
        let (hello, _) = receive(&mut stream, &self.path)?;
        let pid = match answer_hello(&hello) {
            Ok(pid) => pid,
            Err(reason) => {
                let _ = send(&mut stream, &self.path, &refused(&reason), &[]);
                return Ok(Outcome::Refused(reason));
            }
        };
        let Some(offered) = offer() else {
            let reason = "this agent is stopping".to_owned();
            let _ = send(&mut stream, &self.path, &refused(&reason), &[]);
            return Ok(Outcome::Refused(reason));
        };
        let (sockets, mut fds): (Vec<SocketRecord>, Vec<OwnedFd>) =
            offered.sockets.into_iter().unzip();
        let bpf = offered.bpf.map(|(handover, lock)| {
            fds.push(lock);
            handover
        });
        let record = Record::Listeners {
            version: RECORD_VERSION,
            sockets,
            bpf,
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send(&mut stream, &self.path, &record, &raw)?;
        // The new agent holds its own copies now.
        drop(fds);
        // It says it serves once it has started, however long that takes (or it exits, which
        // ends the wait): a time limit here could leave both agents serving for good.
        stream.set_read_timeout(None).map_err(io("SO_RCVTIMEO"))?;
        match receive(&mut stream, &self.path) {
            Ok((
                Record::Serving {
                    adopted,
                    bpf_adopted,
                    ..
                },
                _,
            )) => {
                // The new agent binds this path anew; it is no longer this agent's to remove.
                self.file = None;
                stream
                    .set_read_timeout(Some(EXCHANGE_TIMEOUT))
                    .map_err(io("SO_RCVTIMEO"))?;
                let mover = Mover {
                    stream,
                    path: self.path.clone(),
                    summary: MoveSummary::default(),
                };
                Ok(Outcome::TakenOver {
                    pid,
                    adopted,
                    bpf_adopted,
                    mover,
                })
            }
            Ok((Record::Refused { reason, .. }, _)) => Ok(Outcome::Refused(reason)),
            Ok((other, _)) => Ok(Outcome::Refused(format!(
                "expected serving, got {}",
                other.kind()
            ))),
            Err(e) => Ok(Outcome::Refused(format!(
                "the new agent did not say it serves: {e}"
            ))),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Offering {
    fn drop(&mut self) {
        for path in [&self.bound_at, &self.path] {
            if self.file.is_some() && file_identity(path) == self.file {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Where an agent that is taking over binds its own takeover socket until the old agent
/// stops.
pub fn beside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

/// Moves a taking-over agent's socket from beside `path` onto it (atomically: a new agent
/// connecting meanwhile reaches one of the two).
pub fn install(path: &Path) -> Result<(), TakeoverError> {
    std::fs::rename(beside(path), path).map_err(|source| TakeoverError::Io {
        path: path.to_owned(),
        call: "rename",
        source,
    })
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn refused(reason: &str) -> Record {
    Record::Refused {
        version: RECORD_VERSION,
        reason: reason.to_owned(),
    }
}

/// Writes one record; `fds` travel with its first byte.
fn send(
    stream: &mut UnixStream,
    path: &Path,
    record: &Record,
    fds: &[RawFd],
) -> Result<(), TakeoverError> {
    let io = |call| {
        move |source| TakeoverError::Io {
            path: path.to_owned(),
            call,
            source,
        }
    };
    let encoding = |e: serde_json::Error| TakeoverError::Protocol {
        path: path.to_owned(),
        why: format!("encoding a record: {e}"),
    };
    // A record may carry key schedules: encoded into room made once (its length counted
    // first), so no copy is left behind by a reallocation, and zeroized once sent.
    let mut counted = Counted(0);
    serde_json::to_writer(&mut counted, record).map_err(encoding)?;
    let mut body = zeroize::Zeroizing::new(Vec::with_capacity(counted.0));
    serde_json::to_writer(&mut *body, record).map_err(encoding)?;
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes();
    if fds.len() > MAX_DESCRIPTORS {
        return Err(TakeoverError::Protocol {
            path: path.to_owned(),
            why: format!("{} descriptors in one record", fds.len()),
        });
    }
    let sent = send_with_fds(stream, &len, fds).map_err(io("sendmsg"))?;
    stream.write_all(&len[sent..]).map_err(io("write"))?;
    stream.write_all(&body).map_err(io("write"))?;
    Ok(())
}

/// A writer that only counts.
struct Counted(usize);

impl io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads one record and the descriptors that came with it.
fn receive(stream: &mut UnixStream, path: &Path) -> Result<(Record, Vec<OwnedFd>), TakeoverError> {
    let io = |call| {
        move |source| TakeoverError::Io {
            path: path.to_owned(),
            call,
            source,
        }
    };
    let mut len = [0u8; 4];
    let (got, fds) = receive_with_fds(stream, &mut len).map_err(io("recvmsg"))?;
    if got == 0 {
        return Err(TakeoverError::Protocol {
            path: path.to_owned(),
            why: "the other side closed".into(),
        });
    }
    stream.read_exact(&mut len[got..]).map_err(io("read"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_RECORD {
        return Err(TakeoverError::Protocol {
            path: path.to_owned(),
            why: format!("a record of {len} bytes"),
        });
    }
    let mut body = zeroize::Zeroizing::new(vec![0u8; len]);
    stream.read_exact(&mut body).map_err(io("read"))?;
    let record = serde_json::from_slice(&body).map_err(|e| TakeoverError::Protocol {
        path: path.to_owned(),
        why: format!("not a record: {e}"),
    })?;
    Ok((record, fds))
}

/// The space a control message of `n` descriptors takes.
fn rights_space(n: usize) -> usize {
    let bytes = u32::try_from(n * std::mem::size_of::<RawFd>()).unwrap_or(u32::MAX);
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE(bytes) as usize }
}

/// sendmsg of `data` with `fds` as SCM_RIGHTS; returns the bytes of `data` sent.
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut control = vec![0u64; rights_space(MAX_DESCRIPTORS).div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let fd_bytes = std::mem::size_of_val(fds);
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = rights_space(fds.len());
        // SAFETY: msg_control points at `control`, which is at least CMSG_SPACE(fd_bytes)
        // long and 8-byte aligned, so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for
        // fd_bytes; the copy does not overlap (fds is a separate slice).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_bytes).unwrap_or(u32::MAX)) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    loop {
        // SAFETY: msg points at iov (data, valid for data.len() bytes) and at control, both
        // alive for the call; the kernel only reads them.
        let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(sent.unsigned_abs());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// recvmsg into `buf`, taking any SCM_RIGHTS descriptors (close-on-exec) that came with it.
fn receive_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u64; rights_space(MAX_DESCRIPTORS).div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let got = loop {
        // SAFETY: msg points at iov (buf, writable for buf.len() bytes) and control (writable
        // for msg_controllen bytes), both alive for the call.
        let got =
            unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if got >= 0 {
            break got.unsigned_abs();
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control and msg_controllen; CMSG_FIRSTHDR/NXTHDR walk
    // within them and return null at the end; each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors this process now owns, read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors truncated (MSG_CTRUNC)"));
    }
    Ok((got, fds))
}

/// The connected peer's user id (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    // SAFETY: an all-zero ucred is valid.
    let mut cred: libc::ucred = unsafe { MaybeUninit::zeroed().assume_init() };
    let mut len = u32::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(u32::MAX);
    // SAFETY: cred is a writable ucred and len its size; the kernel writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_take_over() {
        for (own, peer, allowed) in [
            (0, 0, true),
            (1000, 1000, true),
            (1000, 0, true),
            (1000, 1001, false),
            (0, 1000, false),
        ] {
            assert_eq!(peer_allowed(own, peer), allowed, "own {own}, peer {peer}");
        }
    }

    #[test]
    fn hellos_of_another_version_are_refused() {
        let hello = |version| Record::Hello { version, pid: 1 };
        assert_eq!(answer_hello(&hello(RECORD_VERSION)), Ok(1));
        assert!(answer_hello(&hello(RECORD_VERSION + 1)).is_err());
        assert!(
            answer_hello(&Record::Serving {
                version: RECORD_VERSION,
                adopted: vec![],
                bpf_adopted: false,
            })
            .is_err()
        );
    }

    #[test]
    fn a_socket_serves_the_same_address_only() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (bound, wanted, same) in [
            ("127.0.0.1:8443", "127.0.0.1:8443", true),
            ("127.0.0.1:41234", "127.0.0.1:0", true),
            ("127.0.0.1:8443", "127.0.0.1:9443", false),
            ("127.0.0.1:8443", "0.0.0.0:8443", false),
        ] {
            assert_eq!(same_address(a(bound), a(wanted)), same, "{bound} {wanted}");
        }
    }

    #[test]
    fn records_and_descriptors_cross_a_socket_pair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Record::Listeners {
            version: RECORD_VERSION,
            sockets: vec![SocketRecord {
                name: "tls".into(),
                addr,
            }],
            bpf: None,
        };
        let path = Path::new("pair");
        send(&mut a, path, &record, &[listener.as_raw_fd()]).unwrap();
        let (got, fds) = receive(&mut b, path).unwrap();
        assert_eq!(got, record);
        assert_eq!(fds.len(), 1);
        let moved = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(moved.local_addr().unwrap(), addr);
        drop(listener);
        // The moved descriptor is the same listening socket: it still accepts.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (_accepted, _) = moved.accept().unwrap();
    }

    /// A record from an agent that does not send the key exchange groups still reads: they are
    /// 0 (not known), and nothing else changes.
    #[test]
    fn a_record_without_the_groups_reads_as_groups_not_known() {
        let record = ConnectionRecord {
            listener: "web".into(),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            data_path: "splice".into(),
            path_reason: "passthrough".into(),
            session: "SNI a.test".into(),
            client_identity: None,
            client_handshake: Some((0x0304, 0x1301)),
            upstream_handshake: None,
            groups: (0x11ec, 0x001d),
            bytes_up: 1,
            bytes_down: 2,
            upstream_unix: false,
            idle_ms: 3,
            client_leg: None,
            upstream_leg: None,
            sockmap: None,
        };
        let mut older = serde_json::to_value(&record).unwrap();
        older.as_object_mut().unwrap().remove("groups").unwrap();
        let read: ConnectionRecord = serde_json::from_value(older).unwrap();
        assert_eq!(
            read,
            ConnectionRecord {
                groups: (0, 0),
                ..record
            }
        );
    }

    /// A connection's record (a kTLS leg with its key schedule) and its two legs go over,
    /// the new side answers, and the summary counts what it adopted and what it refused.
    #[test]
    fn connections_cross_in_batches_and_are_counted() {
        let (a, b) = UnixStream::pair().unwrap();
        let path = PathBuf::from("pair");
        let schedule: crate::handoff::Schedule =
            serde_json::from_str(r#"{"cipher":"Aes128Gcm","tx":[1,2,3,4],"rx":[5,6,7,8]}"#)
                .unwrap();
        let record = |n: u16| ConnectionRecord {
            listener: "web".into(),
            peer: SocketAddr::from(([127, 0, 0, 1], n)),
            data_path: "ktls".into(),
            path_reason: "kernel offloads".into(),
            session: "client TLSv1.3 AES-128-GCM".into(),
            client_identity: None,
            client_handshake: Some((0x0304, 0x1301)),
            upstream_handshake: None,
            groups: (0x11ec, 0),
            bytes_up: 10,
            bytes_down: 20,
            upstream_unix: false,
            idle_ms: 5,
            client_leg: Some(LegRecord {
                version: crate::ktls::TlsVersion::Tls13,
                cipher: crate::ktls::Cipher::Aes128Gcm,
                agent_is_client: false,
                confidentiality_limit: 1 << 24,
                tx_records: 7,
                key_updates: 2,
                renegotiations_refused: 0,
                warning_alerts: 1,
                tickets: 0,
                schedule: Some(schedule.clone()),
            }),
            upstream_leg: None,
            sockmap: None,
        };
        let legs = || {
            let (x, y) = UnixStream::pair().unwrap();
            (OwnedFd::from(x), OwnedFd::from(y))
        };
        let taker = Taker {
            stream: b,
            path: path.clone(),
        };
        let new_side = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let summary = taker
                .adopt_connections(&mut |batch| {
                    seen.extend(batch.iter().map(|m| m.record.clone()));
                    // The first of each batch is refused.
                    let n = batch.len() as u64;
                    (n - 1, vec!["refused one".into()])
                })
                .unwrap();
            (summary, seen)
        });
        let mut mover = Mover {
            stream: a,
            path,
            summary: MoveSummary::default(),
        };
        let batch = |ports: [u16; 2]| {
            ports
                .map(|p| {
                    let (client, upstream) = legs();
                    MovingConnection {
                        record: record(p),
                        client,
                        upstream,
                    }
                })
                .into()
        };
        assert_eq!(mover.send(batch([1, 2])).unwrap(), vec!["refused one"]);
        mover.send(batch([3, 4])).unwrap();
        let summary = mover.finish(9).unwrap();
        let (theirs, seen) = new_side.join().unwrap();
        let want = MoveSummary {
            moved: 2,
            lost: 2,
            staying: 9,
        };
        assert_eq!((summary, theirs), (want, want));
        assert_eq!(seen, [1, 2, 3, 4].map(record));
        assert_eq!(
            seen[0].client_leg.as_ref().unwrap().schedule,
            Some(schedule)
        );
    }
}
