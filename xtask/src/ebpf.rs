//! Builds the eBPF programs with nightly, `-Z build-std=core` and bpf-linker.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bootstrap::NIGHTLY;
use crate::cmd;

/// ELF machine number for eBPF.
const EM_BPF: u16 = 247;

/// Builds `ebpf/tlsplice-ebpf` and returns the object path after checking it is a BPF ELF.
pub fn build(root: &Path) -> Result<PathBuf> {
    let dir = root.join("ebpf/tlsplice-ebpf");
    cmd::run(
        Command::new("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args(["build", "--release", "--target", "bpfel-unknown-none"])
            .args(["-Z", "build-std=core"])
            .current_dir(&dir)
            // The host workspace's flags and target settings must not leak into the BPF build.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "-Cdebuginfo=2\u{1f}-Clink-arg=--btf",
            ),
    )?;
    let object = dir.join("target/bpfel-unknown-none/release/tlsplice-ebpf");
    let bytes = std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    let machine = bytes.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
    if !bytes.starts_with(b"\x7fELF") || machine != Some(EM_BPF) {
        bail!(
            "{} is not an eBPF ELF object (e_machine {machine:?})",
            object.display()
        );
    }
    let has_program = bytes.windows(7).any(|w| w == b"sockops");
    if !has_program {
        bail!("{} has no sockops program section", object.display());
    }
    println!("ebpf: built {} ({} bytes)", object.display(), bytes.len());
    Ok(object)
}
