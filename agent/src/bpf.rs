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

use std::os::fd::{AsRawFd, BorrowedFd};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, PerCpuValues, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SkSkb, SockOps};
use aya::{Ebpf, EbpfLoader};
use tlsplice_common::{
    LISTENER_NAME_LEN, ListenerName, MAP_LISTENER_NAMES, MAP_LISTENER_PORTS, MAP_PEERS, MAP_SOCKS,
    MAP_STATS, PROG_RECORDS_IN, PROG_RECORDS_OUT, PROG_SOCKOPS, PROG_VERDICT, SockmapPeer, StatKey,
};

/// The eBPF object built by `cargo xtask build-ebpf`, or empty when this binary was built
/// without it (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tlsplice-ebpf.o"));

/// `statfs` magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the eBPF programs could not be loaded, attached or pinned; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// `ebpf.mode = "off"`.
    #[error("disabled by configuration (ebpf.mode = off)")]
    Disabled,
    /// This binary carries no eBPF object.
    #[error(
        "this tlsplice binary was built without its eBPF object (build it with `cargo xtask build-ebpf`, then the agent)"
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
    /// The pin directory is not on a BPF filesystem.
    #[error("{0} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
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

fn is_bpffs(path: &Path) -> Result<bool, BpfError> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| BpfError::Path {
            what: "checking",
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
    // SAFETY: statfs is all-integer plain data, so zeroed is a valid value.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `buf` is a valid,
    // writable statfs.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(BpfError::Path {
            what: "statfs",
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libc targets.
    Ok(buf.f_type as i64 == BPF_FS_MAGIC)
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
    if OBJECT.is_empty() {
        return Err(BpfError::NoObject);
    }
    EbpfLoader::new().load(OBJECT).map_err(|e| {
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
    /// Keeps the programs loaded and the cgroup link alive.
    _ebpf: Ebpf,
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
        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        // Removes what was pinned if anything below fails.
        let mut pins = Pins::prepare(&settings.pin_path)?;
        let mut ebpf = load_object()?;

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
        for name in [
            MAP_STATS,
            MAP_LISTENER_PORTS,
            MAP_LISTENER_NAMES,
            MAP_SOCKS,
            MAP_PEERS,
        ] {
            let map = ebpf.map(name).ok_or(BpfError::Missing(name))?;
            pins.map(name, |pin| map.pin(pin))?;
        }
        let socks = ebpf
            .take_map(MAP_SOCKS)
            .ok_or(BpfError::Missing(MAP_SOCKS))?;
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(socks).map_err(|e| map_error("TLSPLICE_SOCKS", &e))?;
        {
            let program = load_program::<SkSkb>(&mut ebpf, PROG_VERDICT)?;
            program
                .attach(socks.fd())
                .map_err(|e| program_error(PROG_VERDICT, "attach to the sock hash".into(), &e))?;
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
            _ebpf: ebpf,
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

    /// The bpffs directory holding the pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// Adds to counters the agent owns (kept in CPU 0's slot), under one lock.
    pub fn add_all(&self, counts: &[(StatKey, u64)]) -> Result<(), BpfError> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        for (key, n) in counts {
            self.add_locked(&mut stats, key, *n)?;
        }
        Ok(())
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

    /// Gives a client leg and an upstream leg each other as peers and puts the upstream leg
    /// into the sock hash; [`SockmapPair::admit_client`] adds the client leg. The returned pair
    /// takes both out again when dropped.
    pub fn sockmap_pair(
        &self,
        listener: u16,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
    ) -> Result<SockmapPair<'_>, BpfError> {
        let client_cookie = socket_cookie(client).map_err(|e| BpfError::Map {
            map: "TLSPLICE_SOCKS",
            detail: format!("getsockopt(SO_COOKIE) on the client leg: {e}"),
            hint: "",
        })?;
        let upstream_cookie = socket_cookie(upstream).map_err(|e| BpfError::Map {
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
        let one: libc::c_int = 1;
        // SAFETY: `client` is a live socket; SO_RCVLOWAT reads one int from `one`.
        let rc = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(AdmitError::NotKicked(io::Error::last_os_error()));
        }
        Ok(())
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

/// The kernel's cookie for a socket (the sock hash key).
fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket for the call; `cookie` and `len` are valid, writable and
    // sized for SO_COOKIE's u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The head of the kernel's `struct tcp_info` up to `tcpi_bytes_acked` (libc's glibc version
/// stops before it). Layout from include/uapi/linux/tcp.h, stable since 4.x.
#[repr(C)]
#[derive(Default)]
struct TcpInfoHead {
    bytes8: [u8; 8],
    words: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

const _: () = assert!(
    std::mem::size_of::<TcpInfoHead>() == 136
        && std::mem::offset_of!(TcpInfoHead, bytes_acked) == 120
        && std::mem::offset_of!(TcpInfoHead, bytes_received) == 128
);

/// `TCP_ESTABLISHED` from include/net/tcp_states.h.
const TCP_ESTABLISHED: u8 = 1;
/// `TCP_CLOSE_WAIT`: the peer has sent its FIN; this side can still send.
const TCP_CLOSE_WAIT: u8 = 8;

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfoHead> {
    let mut info = TcpInfoHead::default();
    let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket; `info` is writable for `len` bytes and the kernel writes
    // at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of::<TcpInfoHead>() {
        return Err(io::Error::other(
            "kernel's tcp_info has no tcpi_bytes_received",
        ));
    }
    Ok(info)
}

/// Whether a TCP socket is established and has not received a FIN: the only state in which
/// it may enter a sock hash.
pub fn tcp_established(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(tcp_info(fd)?.bytes8[0] == TCP_ESTABLISHED)
}

/// The send sequence consumed on a TCP socket so far (acknowledged plus still queued: the bytes
/// written, plus the SYN and a FIN), and whether the socket can still send. Differences of this
/// value count bytes queued.
pub fn tcp_bytes_queued(fd: BorrowedFd<'_>) -> io::Result<(u64, bool)> {
    let info = tcp_info(fd)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for sockets) writes one int, the bytes not yet acknowledged,
    // into `outq`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let sending = matches!(info.bytes8[0], TCP_ESTABLISHED | TCP_CLOSE_WAIT);
    Ok((info.bytes_acked + u64::try_from(outq).unwrap_or(0), sending))
}

/// Bytes a TCP socket has received plus bytes its peer has acknowledged: it grows whenever
/// anything moves either way, whoever moves it (the agent, splice, kTLS, a sockmap redirect).
pub fn tcp_progress(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = tcp_info(fd)?;
    Ok(info.bytes_acked.wrapping_add(info.bytes_received))
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

/// The pin directory, held with an exclusive flock while this agent uses it, and what this agent
/// pinned there (removed on drop: when the agent stops, or when loading fails half way).
struct Pins {
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// Holds the lock.
    _lock: std::fs::File,
}

impl Pins {
    /// Creates the directory, takes its lock (another live agent holding it is an error, not
    /// something to overwrite) and removes this agent's names left by one that crashed.
    fn prepare(dir: &Path) -> Result<Self, BpfError> {
        let parent = dir.parent().unwrap_or(dir);
        if !is_bpffs(parent)? {
            return Err(BpfError::NotBpffs(parent.to_owned()));
        }
        let path_err = |what, source| BpfError::Path {
            what,
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| path_err("creating", e))?;
        let lock = std::fs::File::open(dir).map_err(|e| path_err("opening", e))?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BpfError::PinDirBusy(dir.to_owned())
            } else {
                path_err("locking", e)
            });
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
            _lock: lock,
        })
    }

    fn program(
        &mut self,
        name: &'static str,
        pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
    ) -> Result<(), BpfError> {
        let path = self.dir.join(name);
        pin(&path).map_err(|e| program_error(name, format!("pin at {}", path.display()), &e))?;
        self.files.push(path);
        Ok(())
    }

    fn map(
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

impl Drop for Pins {
    fn drop(&mut self) {
        for pin in &self.files {
            if let Err(e) = std::fs::remove_file(pin) {
                tracing::warn!(pin = %pin.display(), error = %e, "could not remove pin");
            }
        }
        // Only removes the directory when nothing else is pinned there.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn sum_entries(
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
