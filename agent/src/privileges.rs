//! Dropping capabilities once the privileged start is done (the capabilities kernel interface,
//! through the `caps` crate).
//!
//! Capabilities belong to threads, not processes: a thread keeps its own sets whatever another
//! thread drops. So the agent does everything that needs privilege (binding listeners, loading
//! and attaching eBPF, measuring the sockmap path) before it starts its worker threads, drops
//! here while it is the only thread, and every thread started afterwards inherits the reduced
//! sets.

use caps::{CapSet, Capability, CapsHashSet};

/// A capability kept after start, and why.
pub type Kept = (Capability, &'static str);

/// What the agent still needs once it serves.
pub fn needed(ebpf_loaded: bool) -> Vec<Kept> {
    let mut keep = vec![
        (
            Capability::CAP_NET_BIND_SERVICE,
            "listeners added by a SIGHUP reload may bind ports below 1024",
        ),
        (
            Capability::CAP_SYS_RESOURCE,
            "splice pipes of 256 KiB per direction past fs.pipe-user-pages-soft, which counts every pipe of the user (root) on the node",
        ),
    ];
    if ebpf_loaded {
        keep.push((
            Capability::CAP_BPF,
            "bpf(2) map updates at run time (counters, sockmap entries); kernels with unprivileged BPF disabled refuse every bpf(2) command without it",
        ));
    }
    keep
}

/// Why capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Other threads exist: they would keep their capabilities.
    #[error(
        "{threads} threads are running: capabilities are per thread, so they cannot all be dropped"
    )]
    Threads {
        /// How many.
        threads: usize,
    },
    /// The kernel refused a change.
    #[error("{action}: {source}")]
    Kernel {
        /// What was being done.
        action: String,
        /// Why.
        source: caps::errors::CapsError,
    },
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// Waits (up to two seconds) for threads that are ending to be gone.
fn wait_single_threaded() -> Result<(), PrivilegeError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let n = threads();
        if n <= 1 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(PrivilegeError::Threads { threads: n });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What [`drop_all_but`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The capabilities still held (permitted and effective).
    pub kept: Vec<String>,
    /// The capabilities given up.
    pub dropped: Vec<String>,
    /// Whether the bounding set was reduced too (needs CAP_SETPCAP; without it, nothing this
    /// process executes could regain them anyway, since it holds none it does not keep).
    pub bounding: bool,
}

/// Keeps only `keep` (those of them the process holds) in the permitted and effective sets,
/// empties the inheritable and ambient sets, and reduces the bounding set to `keep` when
/// allowed. Must run while the process has one thread.
pub fn drop_all_but(keep: &[Kept]) -> Result<Dropped, PrivilegeError> {
    wait_single_threaded()?;
    let kernel = |action: &str| {
        let action = action.to_owned();
        move |source| PrivilegeError::Kernel { action, source }
    };
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(kernel("reading the permitted set"))?;
    let wanted: CapsHashSet = keep.iter().map(|(c, _)| *c).collect();
    let kept: CapsHashSet = permitted.intersection(&wanted).copied().collect();
    let mut dropped: Vec<String> = permitted
        .difference(&kept)
        .map(ToString::to_string)
        .collect();
    dropped.sort();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    let bounding = if permitted.contains(&Capability::CAP_SETPCAP) {
        // Only what this kernel knows: dropping a capability it does not (e.g.
        // CAP_CHECKPOINT_RESTORE before 5.9) is EINVAL.
        for cap in caps::runtime::thread_all_supported().difference(&wanted) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(kernel(&format!("dropping {cap} from the bounding set")))?;
        }
        true
    } else {
        false
    };
    caps::clear(None, CapSet::Ambient).map_err(kernel("clearing the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(kernel("clearing the inheritable set"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(kernel("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(kernel("setting the permitted set"))?;
    let mut kept: Vec<String> = kept.iter().map(ToString::to_string).collect();
    kept.sort();
    Ok(Dropped {
        kept,
        dropped,
        bounding,
    })
}
