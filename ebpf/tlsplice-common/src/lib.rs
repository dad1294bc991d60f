//! Map key and value types shared by the eBPF programs (no_std) and the agent (feature `user`).
//!
//! Everything here is `#[repr(C)]` plain data: the layout is the map ABI. Every counter, whether
//! the kernel or the agent writes it, lives in one per-CPU hash map, [`MAP_STATS`], keyed by
//! [`StatKey`]: one reader (the agent's `/metrics`, `tlsplice stats`) sees all of them.
#![cfg_attr(not(test), no_std)]

/// Per-CPU hash map `StatKey -> u64`: every counter.
pub const MAP_STATS: &str = "TLSPLICE_STATS";
/// Hash map `u16 local port (host order) -> u16 listener index`: the ports whose accepted
/// connections the sock_ops program counts. Written by the agent.
pub const MAP_LISTENER_PORTS: &str = "TLSPLICE_PORTS";
/// Hash map `u16 listener index -> ListenerName`: listener names for readers. Written by the
/// agent.
pub const MAP_LISTENER_NAMES: &str = "TLSPLICE_LISTENERS";
/// The sock_ops program.
pub const PROG_SOCKOPS: &str = "tlsplice_sockops";
/// The cgroup_skb programs that count cleartext TLS records on listener sockets.
pub const PROG_RECORDS_IN: &str = "tlsplice_records_in";
/// See [`PROG_RECORDS_IN`].
pub const PROG_RECORDS_OUT: &str = "tlsplice_records_out";
/// Sock hash `u64 socket cookie -> socket`: the plain legs relayed in the kernel.
pub const MAP_SOCKS: &str = "TLSPLICE_SOCKS";
/// Hash map `u64 socket cookie -> SockmapPeer`: where each socket's bytes go.
pub const MAP_PEERS: &str = "TLSPLICE_PEERS";
/// The sk_skb stream verdict program that redirects each leg's bytes to its peer.
pub const PROG_VERDICT: &str = "tlsplice_verdict";
/// Capacity of the sockmap maps (sockets, so half as many connections).
pub const SOCKMAP_MAX_ENTRIES: u32 = 65_536;

/// Where a socket in [`MAP_SOCKS`] sends what it receives, and how much it sent there.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockmapPeer {
    /// The peer socket's cookie (key in [`MAP_SOCKS`]).
    pub peer: u64,
    /// Bytes redirected to the peer, written by the verdict program.
    pub bytes: u64,
    /// Listener index, for the redirect failure counter.
    pub listener: u16,
    /// Always 0.
    pub pad: [u16; 3],
}

/// Capacity of [`MAP_STATS`].
pub const STATS_MAX_ENTRIES: u32 = 8192;
/// Listener index of counters that belong to no listener (a socket the maps do not know).
pub const NO_LISTENER: u16 = u16::MAX;
/// Alert description label for descriptions no TLS version defines: keeps a client from
/// minting counter keys.
pub const ALERT_OTHER: u16 = 255;

/// Capacity of the listener maps.
pub const LISTENERS_MAX_ENTRIES: u32 = 1024;

/// Counter kinds, in [`StatKey::metric`].
pub mod metric {
    /// TCP connections accepted on a listener's port (sock_ops, passive established).
    pub const CONN_ACCEPTED: u16 = 1;
    /// Accepted connections that reached TCP_CLOSE (sock_ops state callback).
    pub const CONN_CLOSED: u16 = 2;
    /// Connections ended, by data path (`a`, [`super::path`]) and outcome (`b`,
    /// [`super::REASONS`] index); written by the agent.
    pub const CONN_OUTCOME: u16 = 3;
    /// TLS handshakes on the client leg by outcome (`a`, [`super::REASONS`] index, 0 =
    /// completed), version (`b`, wire value, 0 = unknown) and cipher suite (`c`, IANA value);
    /// written by the agent.
    pub const HANDSHAKE: u16 = 4;
    /// Plaintext bytes relayed, by data path (`a`) and direction (`b`, [`super::direction`]);
    /// written by the agent when each connection ends.
    pub const BYTES: u16 = 5;
    /// TLS 1.3 key updates followed or made under kTLS; written by the agent.
    pub const KEY_UPDATES: u16 = 6;
    /// TLS handshakes on the upstream leg, labelled like [`HANDSHAKE`]; written by the agent.
    pub const UPSTREAM_HANDSHAKE: u16 = 7;
    /// Bytes the verdict program could not redirect (the peer was not in the map) and passed
    /// to the socket, where the agent forwards them; written by the kernel.
    pub const REDIRECT_FAILED: u16 = 8;
    /// Cleartext TLS records seen in the kernel on a listener's sockets, where a TCP segment
    /// starts with one: `a` direction ([`super::direction`]: UP = received from the client,
    /// DOWN = sent to it), `b` content type (22 handshake, 21 alert), `c` the handshake type
    /// (1 ClientHello, 2 ServerHello) or, for an alert, level << 8 | description, with levels
    /// other than 1 and 2 counted as 0 and descriptions no TLS version defines as
    /// [`super::ALERT_OTHER`].
    pub const TLS_RECORD: u16 = 9;
}

/// Data path codes, in [`StatKey::a`] of path-labelled counters.
pub mod path {
    /// The connection ended before a data path was chosen.
    pub const NONE: u16 = 0;
    /// kTLS with splice.
    pub const KTLS: u16 = 1;
    /// Plain legs spliced through a pipe.
    pub const SPLICE: u16 = 2;
    /// rustls and a copy loop in user space.
    pub const USERSPACE: u16 = 3;
    /// Plain legs redirected by the sockmap verdict program.
    pub const SOCKMAP: u16 = 4;
    /// Names by code.
    pub const NAMES: [&str; 5] = ["none", "ktls", "splice", "userspace", "sockmap"];
}

/// Direction codes, in [`StatKey::b`] of byte counters.
pub mod direction {
    /// Client to upstream.
    pub const UP: u16 = 0;
    /// Upstream to client.
    pub const DOWN: u16 = 1;
    /// Names by code.
    pub const NAMES: [&str; 2] = ["up", "down"];
}

/// Connection and handshake outcomes by index: 0 is success, the last is the catch-all. The
/// agent's connection reports carry these texts as their failure reason.
pub const REASONS: [&str; 24] = [
    "ok",
    "handshake failed",
    "certificate refused",
    "handshake timeout",
    "client certificate unreadable",
    "not TLS",
    "oversized ClientHello",
    "malformed ClientHello",
    "no ClientHello",
    "unknown SNI",
    "upstream unreachable",
    "upstream connect timeout",
    "upstream handshake failed",
    "upstream certificate refused",
    "upstream handshake timeout",
    "proxy header failed",
    "listener requires ktls",
    "relay error",
    "connection limit",
    "listener connection limit",
    "handshake limit",
    "drain deadline",
    "idle timeout",
    "other",
];

/// The [`REASONS`] index of a reason text; texts that carry detail after a colon (e.g.
/// "listener requires ktls: ...") match on the part before it. Unknown texts count as "other".
pub fn reason_index(reason: &str) -> u16 {
    let head = match reason.split_once(':') {
        Some((head, _)) => head,
        None => reason,
    };
    let mut i = 0;
    while i < REASONS.len() {
        if REASONS[i].as_bytes() == head.as_bytes() {
            return i as u16;
        }
        i += 1;
    }
    (REASONS.len() - 1) as u16
}

/// The key of every counter in [`MAP_STATS`]: what (`metric`), on which listener, and up to
/// three labels whose meaning depends on the metric (see [`metric`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatKey {
    /// One of [`metric`].
    pub metric: u16,
    /// Listener index (see [`MAP_LISTENER_NAMES`]).
    pub listener: u16,
    /// First label.
    pub a: u16,
    /// Second label.
    pub b: u16,
    /// Third label.
    pub c: u16,
    /// Always 0: keeps the key free of padding.
    pub pad: u16,
}

/// Longest listener name kept in [`MAP_LISTENER_NAMES`] (longer names are cut).
pub const LISTENER_NAME_LEN: usize = 64;

/// A listener name, NUL-padded UTF-8.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerName {
    /// The bytes.
    pub bytes: [u8; LISTENER_NAME_LEN],
}

// SAFETY: `StatKey` and `ListenerName` are `repr(C)` plain old data made of integers, with no
// padding (six u16; a byte array), and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for StatKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenerName {}
// SAFETY: `repr(C)`: two u64, a u16 and three u16: no padding, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockmapPeer {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_map_to_their_index_with_detail_and_unknown_texts() {
        assert_eq!(reason_index("ok"), 0);
        assert_eq!(REASONS[usize::from(reason_index("not TLS"))], "not TLS");
        assert_eq!(
            REASONS[usize::from(reason_index("listener requires ktls: kernel has no kTLS"))],
            "listener requires ktls"
        );
        assert_eq!(REASONS[usize::from(reason_index("what is this"))], "other");
        let mut sorted = REASONS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), REASONS.len(), "duplicate reason text");
    }

    #[test]
    fn stat_key_has_no_padding() {
        assert_eq!(core::mem::size_of::<StatKey>(), 12);
        assert_eq!(core::mem::size_of::<SockmapPeer>(), 24);
    }
}
