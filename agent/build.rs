//! Embeds the eBPF object built by `cargo xtask build-ebpf` when it exists. Without it the agent
//! still builds, and reports at run time that this binary carries no eBPF programs.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let object =
        manifest.join("../ebpf/tlsplice-ebpf/target/bpfel-unknown-none/release/tlsplice-ebpf");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("tlsplice-ebpf.o");
    println!("cargo::rerun-if-changed={}", object.display());
    let bytes = std::fs::read(&object).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo::warning=no eBPF object at {}: this agent will run without eBPF (build it with `cargo xtask build-ebpf`)",
            object.display()
        );
    }
    if let Err(e) = std::fs::write(&out, bytes) {
        panic!("writing {}: {e}", out.display());
    }
}
