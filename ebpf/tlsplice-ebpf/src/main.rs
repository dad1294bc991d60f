//! tlsplice eBPF programs.
//!
//! `tlsplice_sockops` counts TCP connections established by sockets in the cgroup it is
//! attached to, per CPU, split into accepted (passive) and opened (active).
#![no_std]
#![no_main]

use aya_ebpf::bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB};
use aya_ebpf::macros::{map, sock_ops};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::SockOpsContext;
use tlsplice_common::{CONN_ACTIVE_ESTABLISHED, CONN_COUNTERS, CONN_PASSIVE_ESTABLISHED, Counter};

/// Connections established, per CPU, indexed by `CONN_*`.
#[map]
static CONNECTIONS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(CONN_COUNTERS, 0);

/// Counts established TCP connections.
#[sock_ops]
pub fn tlsplice_sockops(ctx: SockOpsContext) -> u32 {
    let index = match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => CONN_PASSIVE_ESTABLISHED,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => CONN_ACTIVE_ESTABLISHED,
        _ => return 1,
    };
    if let Some(cell) = CONNECTIONS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's cell of a per-CPU array; nothing else writes it
        // while this program runs on this CPU.
        unsafe { (*cell).count += 1 };
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The license the kernel checks before allowing GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
