//! tlsplice: TLS handshakes in user space with rustls, the record layer in the kernel (kTLS),
//! and the bytes moved between legs inside the kernel.
//!
//! Modules by concern:
//! - [`ktls`]: the kTLS kernel interface (the only module that calls it);
//! - [`splice`]: the splice(2)/pipe kernel interface;
//! - [`handoff`]: finishing a rustls handshake and moving the session into the kernel;
//! - [`proxy`]: listeners, the per-connection data path decision, one file per mode;
//! - [`config`]: the TOML configuration;
//! - [`probe`]: what the running kernel and process can do.

pub mod config;
pub mod handoff;
pub mod ktls;
pub mod probe;
pub mod proxy;
pub mod splice;
