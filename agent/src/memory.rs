//! The agent's heap. The binary allocates with jemalloc (`tikv-jemallocator`): connections come
//! and go in bursts, and glibc's arenas kept the memory of a burst for good (RSS 12.6 MB to
//! 110 MB after 45,000 connections, never back; with `malloc_trim` every 2 s still +6 MiB after
//! ten bursts of 1,000), while jemalloc gives pages unused for a second back to the kernel
//! (`dirty_decay_ms`) from a background thread, so an agent that has gone quiet shrinks without
//! any allocation to trigger it. Its per-thread caches are off (`tcache:false`): a worker thread
//! that goes idle never flushes its cache, and after ten bursts of 1,000 connections they held
//! 2-3 MiB for good (+0.7 MiB without them). Its mappings get no transparent huge pages
//! (`thp:never`): a kernel with them always on (Debian's) backed the sparse heap with 2 MiB pages
//! that stayed resident after a burst. The settings are built in from .cargo/config.toml.
//! jemalloc is also the process's `malloc` (feature `jemalloc-is-malloc`, on by default), so the
//! C allocations of aws-lc (rustls' crypto) go back to the kernel the same way and are counted
//! here: in glibc's arenas, a burst of 1,000 handshakes left about 0.5 KiB per connection held
//! (sid guest, kTLS, idle connections: 2.8 KiB per connection, 2.6 with jemalloc).

/// What the heap holds, from jemalloc's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes the program has allocated and not freed.
    pub allocated: u64,
    /// Bytes of the allocator's pages resident in memory (allocated, its metadata, and freed
    /// pages not yet given back).
    pub resident: u64,
    /// Bytes of the allocator's own bookkeeping (never given back: it grows with the peak).
    pub metadata: u64,
}

/// Starts jemalloc's background thread, which gives freed pages back to the kernel as they age.
/// Called once the agent's start, which must run on one thread, is over.
pub fn return_freed_pages_in_background() -> Result<(), String> {
    tikv_jemalloc_ctl::background_thread::write(true).map_err(|e| e.to_string())
}

/// The heap now, when this process allocates with jemalloc (the agent binary), else `None`.
pub fn heap() -> Option<HeapStats> {
    // Statistics are cached until the epoch moves.
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()?;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()?;
    let metadata = tikv_jemalloc_ctl::stats::metadata::read().ok()?;
    // A process whose global allocator is another one has linked jemalloc without using it.
    (allocated > 0).then_some(HeapStats {
        allocated: allocated as u64,
        resident: resident as u64,
        metadata: metadata as u64,
    })
}
