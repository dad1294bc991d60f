//! tlsplice: TLS handshakes in user space with rustls, the record layer in the kernel (kTLS),
//! and the bytes moved between legs inside the kernel.
//!
//! Modules by concern:
//! - [`ktls`]: the kTLS kernel interface (the only module that calls it);
//! - [`handoff`]: finishing a rustls handshake and moving the session into the kernel;
//! - [`probe`]: what the running kernel and process can do.

pub mod handoff;
pub mod ktls;
pub mod probe;
