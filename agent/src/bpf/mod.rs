//! The BPF kernel interface: loading the eBPF object, attaching the sock_ops program to a
//! cgroup, the counter maps (written by the programs and by the agent), and pinning them under a
//! bpffs directory so `tlsplice stats` can read them from another process.
//!
//! The map ABI is in `tlsplice-common`. Every counter lives in one per-CPU hash map; the agent
//! adds its own counts (handshake outcomes, bytes) to CPU 0's slot, under a lock, and readers
//! sum the CPUs.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, PerCpuValues, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SkSkb, SockOps};
use aya::{Ebpf, EbpfLoader};
mod pins;
mod sockmap;

pub use pins::{PinnedSnapshot, read_pinned};
pub use sockmap::{AdmitError, SockmapKeys, SockmapPair};

use pins::{Pins, sum_entries};
use tlsplice_common::{
    LISTENER_NAME_LEN, ListenerName, MAP_LISTENER_NAMES, MAP_LISTENER_PORTS, MAP_PEERS, MAP_SOCKS,
    MAP_STATS, PROG_RECORDS_IN, PROG_RECORDS_OUT, PROG_SOCKOPS, PROG_VERDICT, SockmapPeer, StatKey,
};

/// The eBPF object that build.rs built with this binary, or empty when it was built with
/// `AYA_BUILD_SKIP=1` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tlsplice-ebpf"));

/// Why the eBPF programs could not be loaded, attached or pinned; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// `ebpf.mode = "off"`.
    #[error("disabled by configuration (ebpf.mode = off)")]
    Disabled,
    /// This binary carries no eBPF object.
    #[error(
        "this tlsplice binary was built without its eBPF object (AYA_BUILD_SKIP=1); build it without that to have them"
    )]
    NoObject,
    /// The object could not be loaded (maps are created here).
    #[error("loading the eBPF object: {detail}{hint}")]
    Load {
        /// aya's error chain.
        detail: String,
        /// What is likely missing.
        hint: &'static str,
    },
    /// A program could not be loaded or attached.
    #[error("program {program}: {action}: {detail}{hint}")]
    Program {
        /// Program name.
        program: &'static str,
        /// "load", "attach to cgroup /sys/fs/cgroup", ...
        action: String,
        /// aya's error chain, with the errno.
        detail: String,
        /// What is likely missing.
        hint: &'static str,
    },
    /// The object lacks a program or map this agent needs.
    #[error("the eBPF object has no program or map named {0}")]
    Missing(&'static str),
    /// No cgroup v2 hierarchy to attach the sock_ops program to.
    #[error("no cgroup v2 mount found in /proc/self/mounts (set ebpf.cgroup)")]
    NoCgroup2,
    /// A file system operation on the pin directory or cgroup failed.
    #[error("{what} {path}: {source}")]
    Path {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another running agent holds the pin directory.
    #[error(
        "{0} is in use by another running tlsplice agent (set ebpf.pin_path or --bpf-pin-path per agent)"
    )]
    PinDirBusy(PathBuf),
    /// The pin directory is not on a BPF filesystem, and the agent could not mount one there.
    #[error("{path} is not on a bpf filesystem and {why} (mount one: mount -t bpf bpf {path})")]
    NotBpffs {
        /// The directory that holds the pin directory.
        path: PathBuf,
        /// Why the agent did not mount one itself.
        why: String,
    },
    /// A map operation failed.
    #[error("map {map}: {detail}{hint}")]
    Map {
        /// Map name.
        map: &'static str,
        /// aya's error chain.
        detail: String,
        /// What is likely missing.
        hint: &'static str,
    },
}

/// Verifier logs run to hundreds of lines: the last ones say why.
const VERIFIER_TAIL: usize = 600;

/// An error and its sources, one line (a verifier log cut to its end).
fn chain(e: &dyn std::error::Error) -> String {
    let text = chain_full(e);
    match text.split_once("Verifier output:") {
        Some((head, log)) if log.len() > VERIFIER_TAIL => {
            let mut cut = log.len() - VERIFIER_TAIL;
            while !log.is_char_boundary(cut) {
                cut += 1;
            }
            format!("{head}Verifier output (end): ...{}", &log[cut..])
        }
        _ => text,
    }
}

fn chain_full(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The privilege a permission error most likely lacks.
fn hint_for(detail: &str) -> &'static str {
    if detail.contains("Verifier output") {
        " (the kernel's verifier rejected the program)"
    } else if detail.contains("Operation not permitted") || detail.contains("os error 1)") {
        " (missing CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)"
    } else if detail.contains("Permission denied") {
        " (permission denied: missing CAP_BPF or blocked by a security module)"
    } else {
        ""
    }
}

fn map_error(map: &'static str, e: &MapError) -> BpfError {
    let detail = chain(e);
    BpfError::Map {
        map,
        hint: hint_for(&detail),
        detail,
    }
}

/// The first cgroup v2 mount point of this process's mount namespace.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// This process's cgroup v2 directory: its sockets, accepted ones included, belong to it, so
/// programs attached there see the agent's traffic and not the rest of the node's.
pub fn own_cgroup() -> Option<PathBuf> {
    let mount = cgroup2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = mount.join(relative.trim_start_matches('/'));
    Some(if dir.is_dir() { dir } else { mount })
}

/// Loads the object and every program (each through the verifier) without attaching or
/// pinning anything: what `tlsplice probe` reports as the eBPF state.
pub fn probe_load() -> Result<(), BpfError> {
    let mut ebpf = load_object()?;
    load_program::<SockOps>(&mut ebpf, PROG_SOCKOPS)?;
    load_program::<CgroupSkb>(&mut ebpf, PROG_RECORDS_IN)?;
    load_program::<CgroupSkb>(&mut ebpf, PROG_RECORDS_OUT)?;
    load_program::<SkSkb>(&mut ebpf, PROG_VERDICT)?;
    Ok(())
}

fn program_error(program: &'static str, action: String, e: &dyn std::error::Error) -> BpfError {
    let detail = chain(e);
    BpfError::Program {
        program,
        action,
        hint: hint_for(&detail),
        detail,
    }
}

/// Parses the embedded object and creates its maps (no program is loaded yet).
fn load_object() -> Result<Ebpf, BpfError> {
    load_object_with_maps(None)
}

/// The object, its maps those pinned in `reuse` (a running agent's) when given.
fn load_object_with_maps(reuse: Option<&Path>) -> Result<Ebpf, BpfError> {
    if OBJECT.is_empty() {
        return Err(BpfError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = reuse
        .map(|dir| pins::MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect())
        .unwrap_or_default();
    for (name, pin) in &pins {
        loader.map_pin_path(name, pin.as_path());
    }
    loader.load(OBJECT).map_err(|e| {
        let detail = chain(&e);
        BpfError::Load {
            hint: hint_for(&detail),
            detail,
        }
    })
}

/// A program of the object, as its type, loaded into the kernel (through the verifier).
fn load_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: LoadableProgram + 'a,
{
    let program: &mut P = ebpf
        .program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|e| program_error(name, "type".into(), &e))?;
    program
        .load_program()
        .map_err(|e| program_error(name, "load".into(), &e))?;
    Ok(program)
}

/// The programs this object holds, loadable the same way.
trait LoadableProgram {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! loadable {
    ($($t:ty),*) => {
        $(impl LoadableProgram for $t {
            fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
        })*
    };
}
loadable!(SockOps, CgroupSkb, SkSkb);

/// Where to attach and pin.
#[derive(Debug, Clone)]
pub struct BpfSettings {
    /// bpffs directory for the pins (created; must be on a bpf filesystem).
    pub pin_path: PathBuf,
    /// cgroup v2 directory whose sockets the programs see (default: the agent's own cgroup).
    pub cgroup: Option<PathBuf>,
}

fn fill_ports<T: std::borrow::BorrowMut<MapData>>(
    ports: &mut BpfHashMap<T, u16, u16>,
    listeners: &[ListenerEntry],
) -> Result<(), BpfError> {
    let mut seen = std::collections::BTreeMap::new();
    for l in listeners {
        if l.port == 0 {
            tracing::warn!(listener = %l.name, "listener has no bound port: its kernel-side counts are off");
            continue;
        }
        if let Some(first) = seen.insert(l.port, l.name.as_str()) {
            tracing::warn!(listener = %l.name, other = %first, port = l.port,
                "two listeners share a port: the kernel counts their connections and records under the last one");
        }
        ports
            .insert(l.port, l.index, 0)
            .map_err(|e| map_error("TLSPLICE_PORTS", &e))?;
    }
    Ok(())
}

fn fill_names<T: std::borrow::BorrowMut<MapData>>(
    names: &mut BpfHashMap<T, u16, ListenerName>,
    listeners: &[ListenerEntry],
) -> Result<(), BpfError> {
    for l in listeners {
        let mut bytes = [0u8; LISTENER_NAME_LEN];
        let len = l.name.len().min(LISTENER_NAME_LEN);
        bytes[..len].copy_from_slice(&l.name.as_bytes()[..len]);
        names
            .insert(l.index, ListenerName { bytes }, 0)
            .map_err(|e| map_error("TLSPLICE_LISTENERS", &e))?;
    }
    Ok(())
}

/// A listener as the maps know it.
#[derive(Debug, Clone)]
pub struct ListenerEntry {
    /// Index used in counter keys.
    pub index: u16,
    /// Name.
    pub name: String,
    /// Bound TCP port.
    pub port: u16,
}

/// The loaded object: the sock_ops and cgroup_skb programs attached to the cgroup and the
/// verdict program attached to the sock hash (detached when this is dropped), the maps, and the
/// pins (removed when this is dropped).
pub struct LoadedBpf {
    /// Keeps the programs loaded and the cgroup link alive; `None` only once dropped after a
    /// hand-over (see [`LoadedBpf::hand_over`]).
    ebpf: Option<Ebpf>,
    stats: Mutex<PerCpuHashMap<MapData, StatKey, u64>>,
    socks: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<BpfHashMap<MapData, u64, SockmapPeer>>,
    /// Listener port -> counter index, for the kernel-side counts.
    ports: Mutex<BpfHashMap<MapData, u16, u16>>,
    /// Counter index -> listener name, for `tlsplice stats`.
    names: Mutex<BpfHashMap<MapData, u16, ListenerName>>,
    /// Sockets of live [`SockmapPair`]s.
    sockmap_sockets: std::sync::atomic::AtomicU64,
    nr_cpus: usize,
    pins: Pins,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
}

impl Drop for LoadedBpf {
    fn drop(&mut self) {
        // Handed over: aya would detach the verdict program from the sock hash the new agent
        // now uses (a program attached to a map, not through a link). Its descriptors close
        // with the process instead, which detaches nothing.
        if self
            .pins
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
            && let Some(ebpf) = self.ebpf.take()
        {
            std::mem::forget(ebpf);
        }
    }
}

/// A short fingerprint of the embedded eBPF object (FNV-1a, 64 bits): a new agent adopts a
/// running agent's maps only when both were built with the same object.
pub fn object_id() -> String {
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}-{}", OBJECT.len())
}

impl std::fmt::Debug for LoadedBpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedBpf")
            .field("pin_dir", &self.pins.dir)
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl LoadedBpf {
    /// Loads the object, fills the listener maps, attaches the sock_ops program and pins the
    /// maps and the program.
    pub fn load(settings: &BpfSettings, listeners: &[ListenerEntry]) -> Result<Self, BpfError> {
        Self::load_adopting(settings, listeners, None)
    }

    /// As [`LoadedBpf::load`]; with `adopt` (the pin directory's lock of the agent this one
    /// takes over from), the maps pinned there are reused rather than created: the counters
    /// go on, and the sock hash is shared with the verdict program attached to it (the same
    /// object's). The cgroup programs are this agent's, attached to its own cgroup (each
    /// agent's sockets are in its own).
    pub fn load_adopting(
        settings: &BpfSettings,
        listeners: &[ListenerEntry],
        adopt: Option<std::fs::File>,
    ) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        // Removes what was pinned if anything below fails.
        let mut pins = match adopt {
            Some(lock) => Pins::adopt(&settings.pin_path, lock)?,
            None => Pins::prepare(&settings.pin_path)?,
        };
        let reuse = pins.adopted().then_some(settings.pin_path.as_path());
        let mut ebpf = load_object_with_maps(reuse)?;

        {
            let ports = ebpf
                .map_mut(MAP_LISTENER_PORTS)
                .ok_or(BpfError::Missing(MAP_LISTENER_PORTS))?;
            let mut ports: BpfHashMap<_, u16, u16> =
                BpfHashMap::try_from(ports).map_err(|e| map_error("TLSPLICE_PORTS", &e))?;
            fill_ports(&mut ports, listeners)?;
        }
        {
            let names = ebpf
                .map_mut(MAP_LISTENER_NAMES)
                .ok_or(BpfError::Missing(MAP_LISTENER_NAMES))?;
            let mut names: BpfHashMap<_, u16, ListenerName> =
                BpfHashMap::try_from(names).map_err(|e| map_error("TLSPLICE_LISTENERS", &e))?;
            fill_names(&mut names, listeners)?;
        }

        let cgroup = match &settings.cgroup {
            Some(c) => c.clone(),
            None => own_cgroup().ok_or(BpfError::NoCgroup2)?,
        };
        let cgroup_file = std::fs::File::open(&cgroup).map_err(|source| BpfError::Path {
            what: "opening cgroup",
            path: cgroup.clone(),
            source,
        })?;
        {
            let program = load_program::<SockOps>(&mut ebpf, PROG_SOCKOPS)?;
            // Attached through a BPF link (kernel >= 5.7), which takes no attach flags and
            // coexists with other programs on the cgroup.
            program
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|e| {
                    program_error(
                        PROG_SOCKOPS,
                        format!("attach to cgroup {}", cgroup.display()),
                        &e,
                    )
                })?;
            pins.program(PROG_SOCKOPS, |pin| program.pin(pin))?;
        }
        for (name, attach) in [
            (PROG_RECORDS_IN, CgroupSkbAttachType::Ingress),
            (PROG_RECORDS_OUT, CgroupSkbAttachType::Egress),
        ] {
            let program = load_program::<CgroupSkb>(&mut ebpf, name)?;
            program
                .attach(&cgroup_file, attach, CgroupAttachMode::Single)
                .map_err(|e| {
                    program_error(name, format!("attach to cgroup {}", cgroup.display()), &e)
                })?;
            pins.program(name, |pin| program.pin(pin))?;
        }
        // Adopted maps are pinned already (by the loader's reuse).
        if !pins.adopted() {
            for name in pins::MAP_NAMES {
                let map = ebpf.map(name).ok_or(BpfError::Missing(name))?;
                pins.map(name, |pin| map.pin(pin))?;
            }
        }
        let socks = ebpf
            .take_map(MAP_SOCKS)
            .ok_or(BpfError::Missing(MAP_SOCKS))?;
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(socks).map_err(|e| map_error("TLSPLICE_SOCKS", &e))?;
        {
            let program = load_program::<SkSkb>(&mut ebpf, PROG_VERDICT)?;
            // An adopted sock hash keeps the verdict program it has (the same object's, on the
            // same maps): attaching this one in its place would leave the map without one if
            // this agent then failed to take over and detached it on its way out.
            if !pins.adopted() {
                program.attach(socks.fd()).map_err(|e| {
                    program_error(PROG_VERDICT, "attach to the sock hash".into(), &e)
                })?;
            }
            pins.program(PROG_VERDICT, |pin| program.pin(pin))?;
        }
        let peers = ebpf
            .take_map(MAP_PEERS)
            .ok_or(BpfError::Missing(MAP_PEERS))?;
        let peers: BpfHashMap<MapData, u64, SockmapPeer> =
            BpfHashMap::try_from(peers).map_err(|e| map_error("TLSPLICE_PEERS", &e))?;
        let ports = ebpf
            .take_map(MAP_LISTENER_PORTS)
            .ok_or(BpfError::Missing(MAP_LISTENER_PORTS))?;
        let ports = BpfHashMap::try_from(ports).map_err(|e| map_error("TLSPLICE_PORTS", &e))?;
        let names = ebpf
            .take_map(MAP_LISTENER_NAMES)
            .ok_or(BpfError::Missing(MAP_LISTENER_NAMES))?;
        let names = BpfHashMap::try_from(names).map_err(|e| map_error("TLSPLICE_LISTENERS", &e))?;
        let stats = ebpf
            .take_map(MAP_STATS)
            .ok_or(BpfError::Missing(MAP_STATS))?;
        let stats = PerCpuHashMap::try_from(stats).map_err(|e| map_error("TLSPLICE_STATS", &e))?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, source)| BpfError::Path {
            what: "counting CPUs in",
            path: PathBuf::from(what),
            source,
        })?;
        Ok(Self {
            ebpf: Some(ebpf),
            stats: Mutex::new(stats),
            socks: Mutex::new(socks),
            peers: Mutex::new(peers),
            ports: Mutex::new(ports),
            names: Mutex::new(names),
            sockmap_sockets: std::sync::atomic::AtomicU64::new(0),
            nr_cpus,
            pins,
            cgroup,
        })
    }

    /// Makes the listener maps say `listeners` (after a reload added or removed some): ports
    /// of listeners that are gone stop being counted; names stay, so their counters keep a name.
    pub fn set_listeners(&self, listeners: &[ListenerEntry]) -> Result<(), BpfError> {
        {
            let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
            let stale: Vec<u16> = ports
                .keys()
                .filter_map(Result::ok)
                .filter(|port| !listeners.iter().any(|l| l.port == *port))
                .collect();
            for port in stale {
                ports
                    .remove(&port)
                    .map_err(|e| map_error("TLSPLICE_PORTS", &e))?;
            }
            fill_ports(&mut ports, listeners)?;
        }
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        fill_names(&mut names, listeners)
    }

    /// What a new agent taking over needs to adopt the maps: the pin directory and a copy of
    /// its lock's open file.
    pub fn handover(&self) -> std::io::Result<(PathBuf, std::os::fd::OwnedFd)> {
        Ok((self.pins.dir.clone(), self.pins.lock.try_clone()?.into()))
    }

    /// A new agent adopted the maps: nothing pinned is this agent's to remove, and its
    /// programs are not detached when it stops (the kernel drops its links with its
    /// descriptors; the verdict program stays with the sockets that entered under it).
    pub fn hand_over(&self) {
        self.pins
            .handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Removes this agent's pins now (the agent is stopping; a thread that still holds the
    /// maps would keep them from being dropped): nothing when they were handed over.
    pub fn unpin(&self) {
        self.pins.remove();
    }

    /// This agent has taken over from the one whose maps it adopted: they are its own now.
    pub fn own_adopted(&self) {
        self.pins.own_adopted();
    }

    /// Whether the maps were adopted from the agent before this one.
    pub fn adopted(&self) -> bool {
        self.pins.adopted()
    }

    /// The bpffs directory holding the pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// Adds to counters the agent owns (kept in CPU 0's slot), under one lock. A counter that
    /// cannot be added (a full map) does not keep the others from being added; the first
    /// error is returned.
    pub fn add_all(&self, counts: &[(StatKey, u64)]) -> Result<(), BpfError> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut first_error = None;
        for (key, n) in counts {
            if let Err(e) = self.add_locked(&mut stats, key, *n) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn add_locked(
        &self,
        stats: &mut PerCpuHashMap<MapData, StatKey, u64>,
        key: &StatKey,
        n: u64,
    ) -> Result<(), BpfError> {
        let mut values = match stats.get(key, 0) {
            Ok(v) => v.iter().copied().collect::<Vec<u64>>(),
            Err(MapError::KeyNotFound) => vec![0; self.nr_cpus],
            Err(e) => return Err(map_error("TLSPLICE_STATS", &e)),
        };
        values.resize(self.nr_cpus, 0);
        values[0] = values[0].wrapping_add(n);
        let values = PerCpuValues::try_from(values).map_err(|e| BpfError::Map {
            map: "TLSPLICE_STATS",
            detail: e.to_string(),
            hint: "",
        })?;
        stats
            .insert(key, values, 0)
            .map_err(|e| map_error("TLSPLICE_STATS", &e))
    }

    /// Sockets relayed through the sock hash right now (two per connection), as the agent
    /// counts them (the pinned maps hold the kernel's view: see [`read_pinned`]).
    pub fn sockmap_sockets(&self) -> u64 {
        self.sockmap_sockets
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every counter, summed over CPUs.
    pub fn snapshot(&self) -> Result<BTreeMap<StatKey, u64>, BpfError> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        sum_entries(&stats)
    }
}
