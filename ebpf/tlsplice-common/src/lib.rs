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
    /// Connections ended, by data path (`a`, [`super::DataPath::code`]) and outcome (`b`,
    /// [`super::Reason::code`]); written by the agent.
    pub const CONN_OUTCOME: u16 = 3;
    /// TLS handshakes on the client leg by outcome (`a`, [`super::Reason::code`], 0 =
    /// completed), version (`b`, wire value, 0 = unknown), cipher suite (`c`, IANA value) and
    /// key exchange group (`d`, IANA value, 0 = none or not known); written by the agent.
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

/// How a connection's bytes move after its handshake: the `data_path` label, stored as
/// [`DataPath::code`] in [`StatKey::a`] of path-labelled counters (0: none was chosen).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataPath {
    /// Keys in the kernel (kTLS); bytes spliced through a pipe per direction.
    Ktls = 1,
    /// Both legs plain TCP to the agent (passthrough); spliced through a pipe per direction.
    Splice = 2,
    /// rustls in user space and a copy loop.
    Userspace = 3,
    /// Both legs plain TCP (passthrough) in the eBPF sock hash: the kernel redirects each
    /// segment to the other leg.
    Sockmap = 4,
}

/// [`StatKey::a`] of a path-labelled counter whose connection ended before a data path was
/// chosen.
pub const NO_DATA_PATH: u16 = 0;

impl DataPath {
    /// Every data path, in code order.
    pub const ALL: [DataPath; 4] = [
        DataPath::Ktls,
        DataPath::Splice,
        DataPath::Userspace,
        DataPath::Sockmap,
    ];

    /// The code stored in counter keys.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The data path of a code, if it names one.
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(DataPath::Ktls),
            2 => Some(DataPath::Splice),
            3 => Some(DataPath::Userspace),
            4 => Some(DataPath::Sockmap),
            _ => None,
        }
    }

    /// The label and log name.
    pub const fn as_str(self) -> &'static str {
        match self {
            DataPath::Ktls => "ktls",
            DataPath::Splice => "splice",
            DataPath::Userspace => "userspace",
            DataPath::Sockmap => "sockmap",
        }
    }
}

impl core::fmt::Display for DataPath {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `data_path` label of a code: a data path's name, "none" for [`NO_DATA_PATH`].
pub fn data_path_label(code: u16) -> Option<&'static str> {
    match DataPath::from_code(code) {
        Some(p) => Some(p.as_str()),
        None if code == NO_DATA_PATH => Some("none"),
        None => None,
    }
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

/// Defines [`Reason`] once: variant, code, label and meaning on one line each.
macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident = $code:literal, $label:literal;)*) => {
        /// How a connection (or one TLS handshake) ended: the `outcome` label of
        /// `tlsplice_connections_total` and the handshake counters, and the log line's
        /// `outcome`. Stored as [`Reason::code`] in counter keys. Adding a reason is one line
        /// here.
        #[repr(u16)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant = $code,)*
        }

        impl Reason {
            /// Every reason, in code order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The label and log text.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $label,)*
                }
            }

            /// The code stored in counter keys.
            pub const fn code(self) -> u16 {
                self as u16
            }

            /// The reason a counter key's code stands for.
            pub const fn from_code(code: u16) -> Option<Reason> {
                match code {
                    $($code => Some(Reason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    /// Ended cleanly: both directions closed (close_notify or FIN), or the handshake completed.
    Ok = 0, "ok";
    /// The peer's handshake was refused: rustls sent it an alert (a protocol error, no shared
    /// version or cipher suite, a bad message).
    HandshakeFailed = 1, "handshake failed";
    /// The client's certificate was missing or did not verify (mTLS listeners).
    CertificateRefused = 2, "certificate refused";
    /// No complete handshake (or ClientHello, for passthrough) within handshake_timeout_ms.
    HandshakeTimeout = 3, "handshake timeout";
    /// The verified client certificate could not be parsed for its names.
    ClientCertificateUnreadable = 4, "client certificate unreadable";
    /// A passthrough client's first bytes are not a TLS handshake record.
    NotTls = 5, "not TLS";
    /// A passthrough ClientHello over the size the agent reads.
    OversizedClientHello = 6, "oversized ClientHello";
    /// A passthrough ClientHello that does not parse.
    MalformedClientHello = 7, "malformed ClientHello";
    /// A passthrough client that closed or failed before a whole ClientHello.
    NoClientHello = 8, "no ClientHello";
    /// A passthrough server name with no route and no default upstream.
    UnknownSni = 9, "unknown SNI";
    /// The upstream refused the connection or could not be reached.
    UpstreamUnreachable = 10, "upstream unreachable";
    /// The upstream did not accept the connection within connect_timeout_ms.
    UpstreamConnectTimeout = 11, "upstream connect timeout";
    /// The upstream's TLS handshake failed (other than its certificate, or time).
    UpstreamHandshakeFailed = 12, "upstream handshake failed";
    /// The upstream's certificate did not verify against upstream_tls.
    UpstreamCertificateRefused = 13, "upstream certificate refused";
    /// No complete upstream handshake within handshake_timeout_ms.
    UpstreamHandshakeTimeout = 14, "upstream handshake timeout";
    /// The PROXY protocol header could not be built or written.
    ProxyHeaderFailed = 15, "proxy header failed";
    /// `data_path = "ktls"`, and the kernel cannot offload the negotiated version and cipher.
    KtlsRequired = 16, "listener requires ktls";
    /// An I/O error moving bytes that no other reason names.
    RelayError = 17, "relay error";
    /// The node's max_connections was reached.
    ConnectionLimit = 18, "connection limit";
    /// The listener's max_connections was reached.
    ListenerConnectionLimit = 19, "listener connection limit";
    /// The node's max_handshakes was reached.
    HandshakeLimit = 20, "handshake limit";
    /// Still open when the drain deadline passed (SIGTERM, or a removed listener).
    DrainDeadline = 21, "drain deadline";
    /// No byte either way for idle_timeout_ms.
    IdleTimeout = 22, "idle timeout";
    // 23 was "other", the catch-all of reasons parsed from text: retired, never reused, so a
    // reader of pinned counters from another agent version never mislabels one.
    /// The client aborted its handshake with an alert.
    HandshakeAlertReceived = 24, "handshake alert received";
    /// The client closed or reset the connection during its handshake.
    HandshakePeerClosed = 25, "handshake peer closed";
    /// A peer reset the connection (or its leg was gone) while bytes were relayed.
    PeerReset = 26, "peer reset";
    /// A TLS peer closed TCP without close_notify (a truncation attack looks like this).
    Truncated = 27, "truncated";
    /// A TLS peer sent a fatal alert after the handshake.
    AlertReceived = 28, "alert received";
    /// A TLS record that did not decrypt or parse (rustls, or the kernel: EBADMSG).
    RecordError = 29, "record error";
    /// A post-handshake message the agent does not accept on this leg.
    UnexpectedMessage = 30, "unexpected message";
    /// The kernel refused the session at handoff (the TLS ULP or a key).
    KtlsRefused = 31, "kernel refused ktls";
    /// A TLS 1.3 KeyUpdate on a kernel that cannot take new keys (before 6.14).
    RekeyUnsupported = 32, "rekey unsupported";
    /// The confidentiality limit of one key was near and the session could not rekey.
    RecordLimit = 33, "record limit";
    /// A failure of the agent itself (a rustls session that could not be created, a
    /// poisoned lock).
    Internal = 34, "internal error";
    /// A TLS record longer than its version allows (RFC 8446 5.1, 5.2: 2^14 bytes of
    /// plaintext, 2^14 + 256 of ciphertext); answered with record_overflow where the agent
    /// answers.
    RecordOverflow = 35, "record overflow";
    /// A peer sent TLS 1.3 KeyUpdates faster than `limits.key_updates_per_second` (kTLS), or
    /// more in a row than rustls allows without data between them (user space).
    KeyUpdateRateLimit = 36, "key update rate limit";
    /// The client's source (address, or network under `limits.source_prefix_v4/v6`) held
    /// `per_source_connections` on the listener already.
    SourceConnectionLimit = 37, "source connection limit";
    /// The client's source opened connections faster than `per_source_handshakes_per_second`
    /// (with its burst) allows.
    SourceRateLimit = 38, "source rate limit";
    /// The client's certificate verified but names no identity in the listener's
    /// `allow_clients` (refused with access_denied).
    ClientNotAllowed = 39, "client not allowed";
    /// The upstream's certificate verified but names no identity in `allow_servers`.
    UpstreamNotAllowed = 40, "upstream not allowed";
}

impl core::fmt::Display for Reason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Defines the alert descriptions once (RFC 8446 6, RFC 5246 7.2, and the ones TLS 1.2
/// registries add): what the eBPF programs count by number and the agent names.
macro_rules! alerts {
    ($($code:literal => $name:literal,)*) => {
        /// Whether a TLS version defines this alert description: others are counted as
        /// [`ALERT_OTHER`], so a client cannot mint counter keys.
        pub const fn alert_defined(description: u8) -> bool {
            matches!(description, $($code)|*)
        }

        /// The name of an alert description, if a TLS version defines it.
        pub const fn alert_name(description: u16) -> Option<&'static str> {
            match description {
                $($code => Some($name),)*
                _ => None,
            }
        }
    };
}

alerts! {
    0 => "close_notify",
    10 => "unexpected_message",
    20 => "bad_record_mac",
    21 => "decryption_failed",
    22 => "record_overflow",
    30 => "decompression_failure",
    40 => "handshake_failure",
    41 => "no_certificate",
    42 => "bad_certificate",
    43 => "unsupported_certificate",
    44 => "certificate_revoked",
    45 => "certificate_expired",
    46 => "certificate_unknown",
    47 => "illegal_parameter",
    48 => "unknown_ca",
    49 => "access_denied",
    50 => "decode_error",
    51 => "decrypt_error",
    60 => "export_restriction",
    70 => "protocol_version",
    71 => "insufficient_security",
    80 => "internal_error",
    86 => "inappropriate_fallback",
    90 => "user_canceled",
    100 => "no_renegotiation",
    109 => "missing_extension",
    110 => "unsupported_extension",
    111 => "certificate_unobtainable",
    112 => "unrecognized_name",
    113 => "bad_certificate_status_response",
    114 => "bad_certificate_hash_value",
    115 => "unknown_psk_identity",
    116 => "certificate_required",
    120 => "no_application_protocol",
}

/// An alert description as counted in [`metric::TLS_RECORD`]: itself when a TLS version
/// defines it, else [`ALERT_OTHER`].
pub const fn alert_counted(description: u8) -> u16 {
    if alert_defined(description) {
        description as u16
    } else {
        ALERT_OTHER
    }
}

/// The key of every counter in [`MAP_STATS`]: what (`metric`), on which listener, and up to
/// four labels whose meaning depends on the metric (see [`metric`]).
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
    /// Fourth label (0 where the metric has none; it also keeps the key free of padding).
    pub d: u16,
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
    fn reasons_have_distinct_codes_and_labels_and_round_trip() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(Reason::from_code(r.code()), Some(*r));
            for other in &Reason::ALL[i + 1..] {
                assert!(r.code() < other.code(), "codes in order, each once");
                assert_ne!(r.as_str(), other.as_str(), "duplicate label");
            }
        }
        assert_eq!(Reason::Ok.code(), 0, "0 is success in counter keys");
        // Labels that dashboards already use keep their codes.
        assert_eq!(Reason::HandshakeFailed.code(), 1);
        assert_eq!(Reason::IdleTimeout.code(), 22);
        assert_eq!(Reason::from_code(23), None, "23 (\"other\") is retired");
    }

    #[test]
    fn data_paths_round_trip_and_none_is_labelled() {
        for p in DataPath::ALL {
            assert_eq!(DataPath::from_code(p.code()), Some(p));
            assert_eq!(data_path_label(p.code()), Some(p.as_str()));
        }
        assert_eq!(data_path_label(NO_DATA_PATH), Some("none"));
        assert_eq!(data_path_label(99), None);
    }

    #[test]
    fn every_counted_alert_has_a_name() {
        for d in 0..=u8::MAX {
            let counted = alert_counted(d);
            assert_eq!(alert_defined(d), alert_name(u16::from(d)).is_some(), "{d}");
            if counted != ALERT_OTHER {
                assert!(alert_name(counted).is_some(), "{d} is counted but unnamed");
            }
        }
        assert_eq!(alert_counted(255), ALERT_OTHER);
        assert_eq!(alert_name(50), Some("decode_error"));
    }

    #[test]
    fn stat_key_has_no_padding() {
        assert_eq!(core::mem::size_of::<StatKey>(), 12);
        assert_eq!(core::mem::size_of::<SockmapPeer>(), 24);
    }
}
