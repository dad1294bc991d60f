//! The sockmap relay's maps: a connection's two legs made each other's peers and put into the
//! sock hash, and taken out again when the connection ends.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::maps::MapError;
use tlsplice_common::SockmapPeer;

use super::{BpfError, LoadedBpf, map_error};
use crate::sys;

impl LoadedBpf {
    /// Gives a client leg and an upstream leg each other as peers and puts the upstream leg
    /// into the sock hash; [`SockmapPair::admit_client`] adds the client leg. The returned pair
    /// takes both out again when dropped.
    pub fn sockmap_pair(
        &self,
        listener: u16,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
    ) -> Result<SockmapPair<'_>, BpfError> {
        let client_cookie = sys::socket_cookie(client).map_err(|e| BpfError::Map {
            map: "TLSPLICE_SOCKS",
            detail: format!("getsockopt(SO_COOKIE) on the client leg: {e}"),
            hint: "",
        })?;
        let upstream_cookie = sys::socket_cookie(upstream).map_err(|e| BpfError::Map {
            map: "TLSPLICE_SOCKS",
            detail: format!("getsockopt(SO_COOKIE) on the upstream leg: {e}"),
            hint: "",
        })?;
        self.sockmap_sockets
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let pair = SockmapPair {
            bpf: self,
            cookies: [client_cookie, upstream_cookie],
        };
        {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            for (me, peer) in [
                (client_cookie, upstream_cookie),
                (upstream_cookie, client_cookie),
            ] {
                let entry = SockmapPeer {
                    peer,
                    listener,
                    ..SockmapPeer::default()
                };
                peers
                    .insert(me, entry, 0)
                    .map_err(|e| map_error("TLSPLICE_PEERS", &e))?;
            }
        }
        let mut socks = self.socks.lock().unwrap_or_else(|p| p.into_inner());
        socks
            .insert(upstream_cookie, upstream.as_raw_fd(), 0)
            .map_err(|e| map_error("TLSPLICE_SOCKS", &e))?;
        Ok(pair)
    }

    /// Bytes the verdict program has redirected from the socket `cookie` to its peer.
    fn redirected(&self, cookie: u64) -> u64 {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get(&cookie, 0) {
            Ok(p) => p.bytes,
            Err(e) => {
                tracing::warn!(cookie, error = %e, "reading a sockmap byte count failed");
                0
            }
        }
    }
}

/// A parked connection's two legs in the maps ([`SockmapPair::into_keys`]): plain socket
/// cookies, so the connection holds no borrow of the loaded programs while it is parked.
#[derive(Debug)]
pub struct SockmapKeys([u64; 2]);

impl SockmapKeys {
    /// The two sockets' cookies (client leg, upstream leg).
    pub fn cookies(&self) -> [u64; 2] {
        self.0
    }
}

impl LoadedBpf {
    /// A parked pair that a takeover moved to a new agent: no longer counted here (its
    /// entries stay in the shared maps).
    pub fn sockmap_moved_out(&self, _keys: &SockmapKeys) {
        self.sockmap_sockets
            .fetch_sub(2, std::sync::atomic::Ordering::Relaxed);
    }

    /// A parked pair the agent before this one handed over (its entries are in the adopted
    /// maps): counted here from now on.
    pub fn sockmap_moved_in(&self, cookies: [u64; 2]) -> SockmapKeys {
        self.sockmap_sockets
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        SockmapKeys(cookies)
    }

    /// The pair a parked connection let go of, to be taken out of the maps when dropped.
    pub fn sockmap_pair_again(&self, keys: SockmapKeys) -> SockmapPair<'_> {
        SockmapPair {
            bpf: self,
            cookies: keys.0,
        }
    }
}

/// Why the client leg did not join the sockmap relay.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The sock hash refused it (e.g. it had already received a FIN: only established sockets
    /// may enter); nothing was redirected from it.
    #[error("the client leg could not enter the sock hash: {0}")]
    NotAdmitted(BpfError),
    /// It entered, but the verdict could not be made to run over what it had already
    /// received.
    #[error("setsockopt(SO_RCVLOWAT) on the client leg: {0}")]
    NotKicked(io::Error),
}

/// A connection's two legs in the sock hash. Dropping it removes both sockets and their peer
/// entries (a closed socket leaves the sock hash by itself; its peer entry does not).
pub struct SockmapPair<'a> {
    bpf: &'a LoadedBpf,
    /// Client leg, upstream leg.
    cookies: [u64; 2],
}

impl SockmapPair<'_> {
    /// Puts the client leg into the sock hash, then has the verdict run over anything already
    /// in its receive queue: bytes queued before a socket enters the map are otherwise only
    /// seen when more arrive. Setting SO_RCVLOWAT (to its default, 1) re-runs the socket's
    /// data-ready callback, which is the verdict now.
    pub fn admit_client(&self, client: BorrowedFd<'_>) -> Result<(), AdmitError> {
        {
            let mut socks = self.bpf.socks.lock().unwrap_or_else(|p| p.into_inner());
            socks
                .insert(self.cookies[0], client.as_raw_fd(), 0)
                .map_err(|e| AdmitError::NotAdmitted(map_error("TLSPLICE_SOCKS", &e)))?;
        }
        sys::rerun_data_ready(client).map_err(AdmitError::NotKicked)
    }

    /// Lets go of the pair without taking its sockets out of the maps, for a connection parked
    /// off the runtime; [`LoadedBpf::sockmap_pair_again`] takes it up again.
    pub fn into_keys(self) -> SockmapKeys {
        let keys = SockmapKeys(self.cookies);
        std::mem::forget(self);
        keys
    }

    /// Bytes redirected in the kernel so far: (client to upstream, upstream to client).
    pub fn redirected(&self) -> (u64, u64) {
        (
            self.bpf.redirected(self.cookies[0]),
            self.bpf.redirected(self.cookies[1]),
        )
    }
}

impl Drop for SockmapPair<'_> {
    fn drop(&mut self) {
        self.bpf
            .sockmap_sockets
            .fetch_sub(2, std::sync::atomic::Ordering::Relaxed);
        {
            let mut socks = self.bpf.socks.lock().unwrap_or_else(|p| p.into_inner());
            for cookie in &self.cookies {
                // Absent already when the socket was closed (the kernel unlinks it).
                match socks.remove(cookie) {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => {
                        tracing::warn!(cookie, error = %e, "could not remove a socket from the sock hash")
                    }
                }
            }
        }
        let mut peers = self.bpf.peers.lock().unwrap_or_else(|p| p.into_inner());
        for cookie in &self.cookies {
            match peers.remove(cookie) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => {
                    tracing::warn!(cookie, error = %e, "could not remove a sockmap peer entry")
                }
            }
        }
    }
}

/// A map operation failed because the key was not there.
fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}
