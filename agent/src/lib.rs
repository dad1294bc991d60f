//! tlsplice: TLS handshakes in user space with rustls, the record layer in the kernel (kTLS),
//! and the bytes moved between legs inside the kernel.
//!
//! Modules by concern, from the kernel up:
//! - kernel interfaces, the only modules that call them (and the only ones with `unsafe`):
//!   [`ktls`] (kTLS setsockopt and record-type cmsgs), [`splice`] (splice(2) and pipes),
//!   [`sys`] (TCP_INFO, socket options, rlimit, THP off, the bpffs mount), [`takeover`]
//!   (listening sockets passed to a new agent with SCM_RIGHTS), and [`bpf`] (the eBPF programs
//!   and maps, through aya);
//! - [`net`]: connected sockets as the relays drive them;
//! - [`outcome`]: a connection's typed end ([`outcome::Reason`]) and its report;
//! - [`path`]: which data path a connection takes and why, as pure functions;
//! - [`handoff`]: TLS handshakes that read nothing past their end, and sessions moved into the
//!   kernel;
//! - [`proxy`]: listeners and connections, one file per mode, one per data path;
//! - [`client_hello`], [`proxy_protocol`], [`identity`], [`certs`]: the ClientHello peek, PROXY
//!   headers, certificates and trust, and their reload;
//! - [`config`], [`probe`], [`privileges`]: the configuration, what this kernel can do, the
//!   capabilities kept;
//! - [`metrics`], [`admin`]: counters and their exposition, the admin HTTP server;
//! - [`memory`], [`buffers`]: the heap (jemalloc) and how freed memory goes back to the kernel,
//!   and the buffers connections borrow for a moment.
#![deny(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod bpf;
pub mod buffers;
pub mod certs;
pub mod client_hello;
pub mod config;
pub mod handoff;
pub mod identity;
pub mod ktls;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod ocsp;
pub mod outcome;
pub mod path;
pub mod privileges;
pub mod probe;
pub mod proxy;
pub mod proxy_protocol;
pub mod splice;
pub mod sys;
pub mod takeover;
pub mod tls_policy;

/// Entry points for the fuzz targets in `tests/fuzz` (built with `--cfg fuzzing` by cargo
/// fuzz) into parsers that are not public otherwise.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    /// Judges every message of a post-handshake handshake record as the kTLS path does: each
    /// message's type, body length and whether it ended the connection.
    pub fn post_handshake_record(
        tls13: bool,
        we_are_client: bool,
        record: &[u8],
    ) -> Vec<(u8, usize, bool)> {
        let version = if tls13 {
            crate::ktls::TlsVersion::Tls13
        } else {
            crate::ktls::TlsVersion::Tls12
        };
        crate::proxy::relay::ktls::judge_record(version, we_are_client, record)
            .iter()
            .map(|j| (j.kind, j.body.len(), j.is_fatal()))
            .collect()
    }
}
