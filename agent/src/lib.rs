//! tlsplice: TLS handshakes in user space with rustls, the record layer in the kernel (kTLS),
//! and the bytes moved between legs inside the kernel.
//!
//! Modules by concern:
//! - [`ktls`]: the kTLS kernel interface (the only module that calls it);
//! - [`splice`]: the splice(2)/pipe kernel interface;
//! - [`handoff`]: finishing a rustls handshake and moving the session into the kernel;
//! - [`proxy`]: listeners, the per-connection data path decision, one file per mode;
//! - [`client_hello`]: reading the server name from a peeked ClientHello;
//! - [`config`]: the TOML configuration;
//! - [`identity`]: certificates, keys and CA bundles into rustls configurations;
//! - [`proxy_protocol`]: PROXY v1/v2 headers telling the upstream who the client is;
//! - [`probe`]: what the running kernel and process can do;
//! - [`bpf`]: the eBPF programs and counter maps (the only module that calls BPF);
//! - [`metrics`]: connection counters, Prometheus and `tlsplice stats` output;
//! - [`admin`]: the admin HTTP server (`/metrics`, `/healthz`);
//! - [`limits`]: process resource limits.

pub mod admin;
pub mod bpf;
pub mod certs;
pub mod client_hello;
pub mod config;
pub mod handoff;
pub mod identity;
pub mod ktls;
pub mod limits;
pub mod metrics;
pub mod privileges;
pub mod probe;
pub mod proxy;
pub mod proxy_protocol;
pub mod splice;
