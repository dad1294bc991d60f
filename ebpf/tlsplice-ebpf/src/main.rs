//! tlsplice eBPF programs.
//!
//! `tlsplice_sockops` (attached to a cgroup) counts, per listener and per CPU, the TCP
//! connections accepted on the agent's listener ports and, by asking the kernel for state
//! callbacks on exactly those sockets, the ones that reach TCP_CLOSE.
//!
//! `tlsplice_records_in` / `_out` (cgroup_skb, ingress and egress) count, per listener, the
//! cleartext TLS records a listener socket receives or sends where a TCP segment starts with
//! one: ClientHello, ServerHello and alerts (level, description). Every mode is seen,
//! passthrough included; records after the handshake are encrypted and not looked at.
//!
//! `tlsplice_verdict` (sk_skb stream verdict on the sock hash) relays plain legs in the kernel:
//! each segment a socket in the map receives goes to its peer's egress. A socket without a peer
//! entry gets its bytes passed up (counted), where the agent forwards them itself.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
    BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
};
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::{cgroup_skb, map, sock_ops, stream_verdict};
use aya_ebpf::maps::{HashMap, PerCpuHashMap, SockHash};
use aya_ebpf::programs::{SkBuffContext, SockOpsContext};
use tlsplice_common::{
    LISTENERS_MAX_ENTRIES, ListenerName, NO_LISTENER, SOCKMAP_MAX_ENTRIES, STATS_MAX_ENTRIES,
    SockmapPeer, StatKey, alert_counted, direction, metric,
};

/// Every counter (see tlsplice-common).
#[map(name = "TLSPLICE_STATS")]
static STATS: PerCpuHashMap<StatKey, u64> = PerCpuHashMap::with_max_entries(STATS_MAX_ENTRIES, 0);

/// Listener ports (host order) to listener index; the agent fills it.
#[map(name = "TLSPLICE_PORTS")]
static PORTS: HashMap<u16, u16> = HashMap::with_max_entries(LISTENERS_MAX_ENTRIES, 0);

/// Listener names by index, for readers; the agent fills it, no program reads it.
#[map(name = "TLSPLICE_LISTENERS")]
static LISTENERS: HashMap<u16, ListenerName> = HashMap::with_max_entries(LISTENERS_MAX_ENTRIES, 0);

/// Plain legs relayed in the kernel, by socket cookie.
#[map(name = "TLSPLICE_SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(SOCKMAP_MAX_ENTRIES, 0);

/// Each socket's peer, by socket cookie; the agent fills it before adding the sockets.
#[map(name = "TLSPLICE_PEERS")]
static PEERS: HashMap<u64, SockmapPeer> = HashMap::with_max_entries(SOCKMAP_MAX_ENTRIES, 0);

/// `SK_PASS` from linux/bpf.h: the verdict that delivers (or, with a redirect set, redirects).
const SK_PASS: u32 = 1;
/// `SK_DROP` from linux/bpf.h.
const SK_DROP: u32 = 0;

/// Redirects what a plain leg receives to its peer's egress.
#[stream_verdict]
pub fn tlsplice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper reads the cookie of the socket this skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    // A FIN without data reaches the verdict as an empty skb. It carries nothing: TCP has
    // already marked the socket shut for reading, which is how the agent sees the end. Queued
    // to a psock instead (redirected, or passed to itself behind redirected data), a zero-length
    // send counts as a hard error there: EPIPE on the socket and its transmit stopped.
    if len == 0 {
        return SK_DROP;
    }
    let Some(entry) = PEERS.get_ptr_mut(&cookie) else {
        add(
            &StatKey {
                metric: metric::REDIRECT_FAILED,
                listener: NO_LISTENER,
                ..StatKey::default()
            },
            len,
        );
        return SK_PASS;
    };
    // SAFETY: a map value pointer, valid for this program run; the fields are plain integers.
    let (mut peer, listener) = unsafe { ((*entry).peer, (*entry).listener) };
    if SOCKS.redirect_skb(&ctx, &mut peer, 0) as u32 == SK_PASS {
        // SAFETY: as above. The verdict for one socket runs under that socket's lock (softirq
        // receive, or the agent's setsockopt), so its runs do not overlap.
        unsafe { (*entry).bytes += len };
    } else {
        add(
            &StatKey {
                metric: metric::REDIRECT_FAILED,
                listener,
                ..StatKey::default()
            },
            len,
        );
    }
    SK_PASS
}

/// Adds one to this CPU's cell of `key`, creating it the first time.
fn count(key: &StatKey) {
    add(key, 1);
}

/// Adds `n` to this CPU's cell of `key`, creating it the first time.
fn add(key: &StatKey, n: u64) {
    if let Some(cell) = STATS.get_ptr_mut(key) {
        // SAFETY: the pointer is this CPU's value of a per-CPU hash entry, valid for this run.
        // The bpfel target has no atomic add in Rust: a run in softirq that interrupts one in
        // process context on the same CPU and counts the same key (only a close racing a reset
        // can) may lose that one count.
        unsafe { *cell += n };
        return;
    }
    // On EEXIST another run created the entry first, and this CPU's value starts at 0 there.
    if STATS.insert(key, n, u64::from(BPF_NOEXIST)).is_err()
        && let Some(cell) = STATS.get_ptr_mut(key)
    {
        // SAFETY: as above.
        unsafe { *cell += n };
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

/// Counts the cleartext TLS record a segment of a listener socket starts with, if any.
/// `listener_port_at` is the offset in the TCP header of the port that must be a listener's:
/// the destination (2) on ingress, the source (0) on egress.
fn count_record(ctx: &SkBuffContext, listener_port_at: usize, dir: u16) {
    let Ok(first) = ctx.load::<u8>(0) else { return };
    let (ip_len, proto) = match first >> 4 {
        4 => (
            usize::from(first & 0x0f) * 4,
            ctx.load::<u8>(9).unwrap_or(0),
        ),
        6 => (40, ctx.load::<u8>(6).unwrap_or(0)),
        _ => return,
    };
    // IPPROTO_TCP; IPv6 extension headers are not followed.
    if proto != 6 {
        return;
    }
    let Ok(port) = ctx.load::<u16>(ip_len + listener_port_at) else {
        return;
    };
    // SAFETY: a plain u16 read from a map value.
    let Some(listener) = (unsafe { PORTS.get(u16::from_be(port)) }).copied() else {
        return;
    };
    let Ok(doff) = ctx.load::<u8>(ip_len + 12) else {
        return;
    };
    let payload = ip_len + usize::from(doff >> 4) * 4;
    // Record header (type, version, length) and the first two bytes of its body.
    let Ok(head) = ctx.load::<[u8; 7]>(payload) else {
        return;
    };
    let record_len = u16::from_be_bytes([head[3], head[4]]);
    if head[1] != 3 || head[2] > 4 || record_len > 16_384 + 256 {
        return;
    }
    let label = match head[0] {
        // A handshake record whose first message is a ClientHello or ServerHello (under 64 KiB:
        // the top byte of its 24-bit length is 0).
        22 if (head[5] == 1 || head[5] == 2) && head[6] == 0 => u16::from(head[5]),
        // A cleartext alert is exactly two bytes: level, description.
        21 if record_len == 2 => {
            let level = if head[5] == 1 || head[5] == 2 {
                u16::from(head[5])
            } else {
                0
            };
            (level << 8) | alert_counted(head[6])
        }
        _ => return,
    };
    count(&StatKey {
        metric: metric::TLS_RECORD,
        listener,
        a: dir,
        b: u16::from(head[0]),
        c: label,
        d: 0,
    });
}

/// Records received by listener sockets.
#[cgroup_skb(ingress)]
pub fn tlsplice_records_in(ctx: SkBuffContext) -> i32 {
    count_record(&ctx, 2, direction::UP);
    1
}

/// Records sent by listener sockets.
#[cgroup_skb(egress)]
pub fn tlsplice_records_out(ctx: SkBuffContext) -> i32 {
    count_record(&ctx, 0, direction::DOWN);
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
