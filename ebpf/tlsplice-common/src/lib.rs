//! Map key and value types shared by the eBPF programs (no_std) and the agent (feature `user`).
//!
//! Everything here is `#[repr(C)]` plain data: the layout is the map ABI.
#![no_std]

/// Index into the `CONNECTIONS` per-CPU array: connections the agent's sockets accepted.
pub const CONN_PASSIVE_ESTABLISHED: u32 = 0;
/// Index into the `CONNECTIONS` per-CPU array: connections the agent's sockets opened.
pub const CONN_ACTIVE_ESTABLISHED: u32 = 1;
/// Number of entries in the `CONNECTIONS` per-CPU array.
pub const CONN_COUNTERS: u32 = 2;

/// A per-CPU counter cell.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    /// Events counted on this CPU.
    pub count: u64,
}

// SAFETY: `Counter` is `repr(C)` plain old data with no padding and every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}
