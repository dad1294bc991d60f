//! The pin directory: on a BPF filesystem (mounted by the agent when it may), held with a lock
//! while this agent uses it, emptied of what it pinned when it stops; and a running agent's
//! counters read back from its pins (`tlsplice stats`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, SockHash};
use tlsplice_common::{
    LISTENER_NAME_LEN, ListenerName, MAP_LISTENER_NAMES, MAP_LISTENER_PORTS, MAP_PEERS, MAP_SOCKS,
    MAP_STATS, PROG_RECORDS_IN, PROG_RECORDS_OUT, PROG_SOCKOPS, PROG_VERDICT, SockmapPeer, StatKey,
};

use super::{BpfError, chain, hint_for, map_error, program_error};
use crate::sys;

fn is_bpffs(path: &Path) -> Result<bool, BpfError> {
    sys::is_bpffs(path).map_err(|source| BpfError::Path {
        what: "statfs",
        path: path.to_owned(),
        source,
    })
}

/// Makes sure `dir` is on a BPF filesystem: when it is not, and it is an empty directory (or
/// missing), mounts one there, as systemd does at boot and Cilium's agent does when it must.
/// A directory with anything in it is never mounted over.
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    if dir.is_dir() && is_bpffs(dir)? {
        return Ok(());
    }
    let not_bpffs = |why: String| BpfError::NotBpffs {
        path: dir.to_owned(),
        why,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| not_bpffs(format!("cannot be created: {e}")))?;
        // Made inside a bpf filesystem: nothing to mount.
        if is_bpffs(dir)? {
            return Ok(());
        }
    }
    let mut entries =
        std::fs::read_dir(dir).map_err(|e| not_bpffs(format!("cannot be listed: {e}")))?;
    if entries.next().is_some() {
        return Err(not_bpffs(
            "is not empty, so the agent does not mount over it".into(),
        ));
    }
    sys::mount_bpffs(dir).map_err(|e| not_bpffs(format!("mounting one failed: {e}")))?;
    tracing::info!(path = %dir.display(), "mounted a bpf filesystem for the pins");
    Ok(())
}

/// Every name this agent pins.
const PIN_NAMES: [&str; 9] = [
    PROG_SOCKOPS,
    PROG_RECORDS_IN,
    PROG_RECORDS_OUT,
    PROG_VERDICT,
    MAP_STATS,
    MAP_LISTENER_PORTS,
    MAP_LISTENER_NAMES,
    MAP_SOCKS,
    MAP_PEERS,
];

/// The maps, in the order they are pinned.
pub(super) const MAP_NAMES: [&str; 5] = [
    MAP_STATS,
    MAP_LISTENER_PORTS,
    MAP_LISTENER_NAMES,
    MAP_SOCKS,
    MAP_PEERS,
];

/// The pin directory, held with an exclusive flock while this agent uses it, and what this agent
/// pinned there (removed on drop: when the agent stops, or when loading fails half way).
pub(super) struct Pins {
    pub(super) dir: PathBuf,
    files: Vec<PathBuf>,
    /// Holds the lock (its open file, shared with the agent before this one after a takeover:
    /// a flock belongs to the open file, so the lock stays held while either has it open).
    pub(super) lock: std::fs::File,
    /// The maps were adopted from the agent before this one ([`Pins::adopt`]): theirs to remove
    /// only once this agent has taken over (`adopted_owned`).
    adopted: bool,
    adopted_owned: std::sync::atomic::AtomicBool,
    /// Handed to a new agent: nothing here is this agent's to remove any more.
    pub(super) handed_over: std::sync::atomic::AtomicBool,
    /// Already removed ([`Pins::remove`]).
    removed: std::sync::atomic::AtomicBool,
}

impl Pins {
    /// Creates the directory, takes its lock (another live agent holding it is an error, not
    /// something to overwrite) and removes this agent's names left by one that crashed.
    pub(super) fn prepare(dir: &Path) -> Result<Self, BpfError> {
        ensure_bpffs(dir.parent().unwrap_or(dir))?;
        let path_err = |what, source| BpfError::Path {
            what,
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| path_err("creating", e))?;
        let lock = std::fs::File::open(dir).map_err(|e| path_err("opening", e))?;
        if !sys::try_lock_exclusive(&lock).map_err(|e| path_err("locking", e))? {
            return Err(BpfError::PinDirBusy(dir.to_owned()));
        }
        for name in PIN_NAMES {
            let stale = dir.join(name);
            if stale.exists() {
                tracing::warn!(pin = %stale.display(), "removing a stale pin from an earlier agent");
                std::fs::remove_file(&stale).map_err(|e| path_err("removing a stale pin in", e))?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            files: Vec::new(),
            lock,
            adopted: false,
            adopted_owned: std::sync::atomic::AtomicBool::new(false),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            removed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The pin directory of the agent this one takes over from, with that agent's lock (its
    /// open file, passed over the takeover socket): its maps stay and are reused; its
    /// programs' pins are replaced by this agent's (its programs stay attached through their
    /// links until it exits).
    pub(super) fn adopt(dir: &Path, lock: std::fs::File) -> Result<Self, BpfError> {
        for name in [
            PROG_SOCKOPS,
            PROG_RECORDS_IN,
            PROG_RECORDS_OUT,
            PROG_VERDICT,
        ] {
            let pin = dir.join(name);
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BpfError::Path {
                        what: "replacing a program pin in",
                        path: dir.to_owned(),
                        source,
                    });
                }
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            files: Vec::new(),
            lock,
            adopted: true,
            adopted_owned: std::sync::atomic::AtomicBool::new(false),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            removed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the maps were adopted (so they are already pinned).
    pub(super) fn adopted(&self) -> bool {
        self.adopted
    }

    /// This agent has taken over: the adopted maps' pins are its own to remove when it stops.
    pub(super) fn own_adopted(&self) {
        self.adopted_owned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn program(
        &mut self,
        name: &'static str,
        pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
    ) -> Result<(), BpfError> {
        let path = self.dir.join(name);
        pin(&path).map_err(|e| program_error(name, format!("pin at {}", path.display()), &e))?;
        self.files.push(path);
        Ok(())
    }

    pub(super) fn map(
        &mut self,
        name: &'static str,
        pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
    ) -> Result<(), BpfError> {
        let path = self.dir.join(name);
        pin(&path).map_err(|e| {
            let detail = chain(&e);
            BpfError::Map {
                map: name,
                hint: hint_for(&detail),
                detail: format!("pin at {}: {detail}", path.display()),
            }
        })?;
        self.files.push(path);
        Ok(())
    }
}

impl Pins {
    /// Removes what this agent pinned (and the adopted maps' pins once they are its own),
    /// once; nothing when it handed them to a new agent.
    pub(super) fn remove(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.handed_over.load(Relaxed) || self.removed.swap(true, Relaxed) {
            return;
        }
        let adopted_maps = (self.adopted && self.adopted_owned.load(Relaxed))
            .then(|| MAP_NAMES.iter().map(|name| self.dir.join(name)))
            .into_iter()
            .flatten();
        for pin in self.files.iter().cloned().chain(adopted_maps) {
            if let Err(e) = std::fs::remove_file(&pin) {
                tracing::warn!(pin = %pin.display(), error = %e, "could not remove pin");
            }
        }
        // Only removes the directory when nothing else is pinned there.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.remove();
    }
}

pub(super) fn sum_entries(
    stats: &PerCpuHashMap<MapData, StatKey, u64>,
) -> Result<BTreeMap<StatKey, u64>, BpfError> {
    let mut out = BTreeMap::new();
    for entry in stats.iter() {
        let (key, values) = entry.map_err(|e| map_error("TLSPLICE_STATS", &e))?;
        let total = values.iter().fold(0u64, |sum, v| sum.wrapping_add(*v));
        out.insert(key, total);
    }
    Ok(out)
}

/// The counters and listener names of a running agent, read from its pins.
#[derive(Debug, Clone, Default)]
pub struct PinnedSnapshot {
    /// Every counter, summed over CPUs.
    pub counters: BTreeMap<StatKey, u64>,
    /// Listener names by index.
    pub listeners: BTreeMap<u16, String>,
    /// Sockets in the sockmap relay right now (two per connection); `None` without eBPF.
    pub sockmap_sockets: Option<u64>,
    /// Peer entries in the sockmap relay right now (read from the pins only).
    pub sockmap_peers: Option<u64>,
}

/// Reads a running agent's counters from the maps pinned under `pin_dir`.
pub fn read_pinned(pin_dir: &Path) -> Result<PinnedSnapshot, BpfError> {
    let open = |name: &'static str| {
        MapData::from_pin(pin_dir.join(name)).map_err(|e| {
            let detail = chain(&e);
            BpfError::Map {
                map: name,
                hint: if detail.contains("No such file") {
                    " (is the agent running with eBPF on, pinning there?)"
                } else {
                    hint_for(&detail)
                },
                detail: format!("{}: {detail}", pin_dir.join(name).display()),
            }
        })
    };
    let stats = aya::maps::Map::PerCpuHashMap(open(MAP_STATS)?);
    let stats: PerCpuHashMap<_, StatKey, u64> =
        PerCpuHashMap::try_from(stats).map_err(|e| map_error("TLSPLICE_STATS", &e))?;
    let counters = sum_entries(&stats)?;
    let names = aya::maps::Map::HashMap(open(MAP_LISTENER_NAMES)?);
    let names: BpfHashMap<_, u16, ListenerName> =
        BpfHashMap::try_from(names).map_err(|e| map_error("TLSPLICE_LISTENERS", &e))?;
    let mut listeners = BTreeMap::new();
    for entry in names.iter() {
        let (index, name) = entry.map_err(|e| map_error("TLSPLICE_LISTENERS", &e))?;
        let end = name
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(LISTENER_NAME_LEN);
        listeners.insert(
            index,
            String::from_utf8_lossy(&name.bytes[..end]).into_owned(),
        );
    }
    let peers = aya::maps::Map::HashMap(open(MAP_PEERS)?);
    let peers: BpfHashMap<_, u64, SockmapPeer> =
        BpfHashMap::try_from(peers).map_err(|e| map_error("TLSPLICE_PEERS", &e))?;
    let peer_entries = count_keys(peers.keys(), MAP_PEERS)?;
    let socks = aya::maps::Map::SockHash(open(MAP_SOCKS)?);
    let socks: SockHash<_, u64> =
        SockHash::try_from(socks).map_err(|e| map_error("TLSPLICE_SOCKS", &e))?;
    let sock_entries = count_keys(socks.keys(), MAP_SOCKS)?;
    Ok(PinnedSnapshot {
        counters,
        listeners,
        sockmap_sockets: Some(sock_entries),
        sockmap_peers: Some(peer_entries),
    })
}

fn count_keys(
    keys: impl Iterator<Item = Result<u64, MapError>>,
    map: &'static str,
) -> Result<u64, BpfError> {
    let mut n = 0;
    for key in keys {
        key.map_err(|e| map_error(map, &e))?;
        n += 1;
    }
    Ok(n)
}
