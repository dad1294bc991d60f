//! tlsplice eBPF programs.
//!
//! `tlsplice_sockops` (attached to a cgroup) counts, per listener and per CPU, the TCP
//! connections accepted on the agent's listener ports and, by asking the kernel for state
//! callbacks on exactly those sockets, the ones that reach TCP_CLOSE.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
    BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
};
use aya_ebpf::macros::{map, sock_ops};
use aya_ebpf::maps::{HashMap, PerCpuHashMap};
use aya_ebpf::programs::SockOpsContext;
use tlsplice_common::{LISTENERS_MAX_ENTRIES, ListenerName, STATS_MAX_ENTRIES, StatKey, metric};

/// Every counter (see tlsplice-common).
#[map(name = "TLSPLICE_STATS")]
static STATS: PerCpuHashMap<StatKey, u64> = PerCpuHashMap::with_max_entries(STATS_MAX_ENTRIES, 0);

/// Listener ports (host order) to listener index; the agent fills it.
#[map(name = "TLSPLICE_PORTS")]
static PORTS: HashMap<u16, u16> = HashMap::with_max_entries(LISTENERS_MAX_ENTRIES, 0);

/// Listener names by index, for readers; the agent fills it, no program reads it.
#[map(name = "TLSPLICE_LISTENERS")]
static LISTENERS: HashMap<u16, ListenerName> = HashMap::with_max_entries(LISTENERS_MAX_ENTRIES, 0);

/// Adds one to this CPU's cell of `key`, creating it the first time.
fn count(key: &StatKey) {
    if let Some(cell) = STATS.get_ptr_mut(key) {
        // SAFETY: the pointer is this CPU's value of a per-CPU hash entry; only this program,
        // on this CPU and not preempted, writes it.
        unsafe { *cell += 1 };
        return;
    }
    // Another program run on this CPU cannot interleave; on EEXIST another CPU created the
    // entry first, and this CPU's value starts at 0 there.
    if STATS.insert(key, 1u64, u64::from(BPF_NOEXIST)).is_err()
        && let Some(cell) = STATS.get_ptr_mut(key)
    {
        // SAFETY: as above.
        unsafe { *cell += 1 };
    }
}

fn listener_of(ctx: &SockOpsContext) -> Option<u16> {
    // local_port is in host byte order in bpf_sock_ops.
    let port = ctx.local_port() as u16;
    // SAFETY: a plain u16 read from a map value; a concurrent update can at worst give the
    // old or new index.
    unsafe { PORTS.get(port) }.copied()
}

/// Counts accepted and closed connections on listener ports.
#[sock_ops]
pub fn tlsplice_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if let Some(listener) = listener_of(&ctx) {
                count(&StatKey {
                    metric: metric::CONN_ACCEPTED,
                    listener,
                    ..StatKey::default()
                });
                // Ask for state callbacks on this socket only, so its close is seen.
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE
                && let Some(listener) = listener_of(&ctx)
            {
                count(&StatKey {
                    metric: metric::CONN_CLOSED,
                    listener,
                    ..StatKey::default()
                });
            }
        }
        _ => {}
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
